//! The executor runs one job: it asks the router for the routes that fit,
//! asks the key pool for a key that can serve now (cheapest tier first),
//! has the plugin build the request, sends it, has the plugin classify the
//! response, and decides the job's and the key's fate.
//!
//! It owns the *policy* of a job's life: waiting for capacity instead of
//! failing, spilling to a dearer tier after `wait_for_cheaper`, moving to the
//! next key at once after a 429, backing off after transient errors, budgets,
//! deadlines and fan-out. The mechanisms live elsewhere (`router`, `pool`,
//! `limits`, `plugin_host`, `upstream`, `queue`).

use crate::budget::Budgets;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::job::{
    Attempt, FailureKind, Job, JobResult, ModelResponse, ResultError, Status, Tier, UsageOut,
};
use crate::keys::KeyId;
use crate::plugin_host::PluginHost;
use crate::pool::{Acquire, AcquireRequest, Fate, KeyPool};
use crate::queue::{Disposition, JobContext, JobHandler};
use crate::router::{Route, RouteTable};
use crate::upstream::Upstream;
use futures::future::BoxFuture;
use llmq_sdk::{ChatRequest, Outcome, PrepareInput, ProviderInfo};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::Instrument;

/// Transient failures tolerated per job before it fails as `exhausted`.
pub const MAX_TRANSIENT_TRIES: u32 = 5;
/// First backoff after a transient failure; doubles each time.
pub const TRANSIENT_BACKOFF: Duration = Duration::from_secs(1);

/// Everything a job needs, swappable as one piece on SIGHUP.
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Arc<RouteTable>,
    pub pool: Arc<KeyPool>,
    pub plugins: Arc<PluginHost>,
    pub budgets: Arc<Budgets>,
}

/// Runs jobs. Cheap to share.
pub struct Executor {
    runtime: RwLock<Arc<Runtime>>,
    upstream: Upstream,
    clock: SharedClock,
    test_hooks: bool,
}

/// The outcome of running one model for a job (the whole job, or one fan-out branch).
#[derive(Debug, Clone)]
pub struct Branch {
    pub model_asked: String,
    pub status: Status,
    pub output: Option<String>,
    pub route: Option<Arc<Route>>,
    pub key: Option<KeyId>,
    pub usage: Option<UsageOut>,
    pub cost_usd: f64,
    pub attempts: Vec<Attempt>,
    pub error: Option<ResultError>,
    pub duration_ms: u64,
}

impl Executor {
    pub fn new(runtime: Runtime, upstream: Upstream, clock: SharedClock) -> Executor {
        Executor {
            runtime: RwLock::new(Arc::new(runtime)),
            upstream,
            clock,
            test_hooks: std::env::var("LLMQ_TEST_HOOKS").is_ok_and(|v| v == "1"),
        }
    }

    /// The current runtime (config, routes, keys, plugins).
    pub fn runtime(&self) -> Arc<Runtime> {
        match self.runtime.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in a reloaded runtime. Jobs in flight keep the one they started with.
    pub fn replace_runtime(&self, runtime: Runtime) {
        let new = Arc::new(runtime);
        match self.runtime.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// Runs a job to its result.
    pub async fn execute(&self, job: &Job, ctx: &JobContext) -> JobResult {
        let rt = self.runtime();
        let started = self.clock.now();
        let deadline_after = job
            .deadline_s
            .map(Duration::from_secs)
            .unwrap_or(rt.config.routing.default_deadline);
        let waited =
            Duration::from_millis(self.clock.unix_ms().saturating_sub(ctx.enqueued_unix_ms));
        let deadline = started + deadline_after.saturating_sub(waited);

        let mut result = if job.models.is_empty() {
            let branch = self
                .run_branch(&rt, job, job.model.as_deref(), deadline)
                .await;
            branch_to_result(job, branch)
        } else {
            let branches = futures::future::join_all(
                job.models
                    .iter()
                    .map(|m| self.run_branch(&rt, job, Some(m.as_str()), deadline)),
            )
            .await;
            fan_out_result(job, branches)
        };
        let mut attempts = ctx.previous_attempts.clone();
        attempts.append(&mut result.attempts);
        result.attempts = attempts;
        result.queued_ms = waited.as_millis() as u64;
        result.duration_ms = self.clock.now().saturating_sub(started).as_millis() as u64;
        result.metadata = job.metadata.clone();
        result
    }

    /// One model's life: route, wait, call, classify, retry elsewhere.
    async fn run_branch(
        &self,
        rt: &Runtime,
        job: &Job,
        model: Option<&str>,
        deadline: Duration,
    ) -> Branch {
        let started = self.clock.now();
        let mut branch = Branch {
            model_asked: model.unwrap_or_default().to_string(),
            status: Status::Failed,
            output: None,
            route: None,
            key: None,
            usage: None,
            cost_usd: 0.0,
            attempts: vec![],
            error: None,
            duration_ms: 0,
        };
        let fail = |mut b: Branch, kind: FailureKind, msg: String, now: Duration| {
            b.error = Some(ResultError { kind, message: msg });
            b.duration_ms = now.saturating_sub(started).as_millis() as u64;
            b
        };
        let plan = match rt.router.plan(job, model) {
            Ok(p) => p,
            Err(e) => {
                return fail(
                    branch,
                    FailureKind::NoRoute,
                    e.to_string(),
                    self.clock.now(),
                )
            }
        };
        let mut routes: Vec<Arc<Route>> = plan.routes.clone();
        let prompt_tokens = llmq_sdk::estimate::prompt_tokens(&job.messages);
        let max_tokens = job
            .max_tokens
            .map(u64::from)
            .unwrap_or(llmq_sdk::estimate::DEFAULT_MAX_TOKENS);
        let charged = prompt_tokens + max_tokens;
        let spill_at = started + rt.config.routing.wait_for_cheaper;
        let mut transient_tries = 0u32;
        let mut backoff_until: HashMap<KeyId, Duration> = HashMap::new();
        let mut last_upstream_error: Option<String> = None;
        let pinned: Option<KeyId> = match job.route.key.as_deref().map(str::parse::<KeyId>) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(_)) => {
                return fail(
                    branch,
                    FailureKind::InvalidJob,
                    "route.key must look like provider#N (e.g. groq#2)".to_string(),
                    self.clock.now(),
                )
            }
        };

        loop {
            let now = self.clock.now();
            if now >= deadline {
                let why = last_upstream_error
                    .clone()
                    .map(|e| format!("; last upstream error: {e}"))
                    .unwrap_or_default();
                return fail(
                    branch,
                    FailureKind::Deadline,
                    format!("deadline reached before any key could serve the job{why}"),
                    now,
                );
            }
            // The cheapest tier that can ever serve; dearer tiers only after spill_at.
            let epoch = rt.pool.epoch();
            let mut never: Vec<String> = Vec::new();
            let mut earliest: Option<Duration> = None;
            let mut cheapest_live: Option<Tier> = None;
            let mut granted = None;
            for route in &routes {
                if let Some(cap) = cheapest_live {
                    if route.tier > cap && now < spill_at {
                        // A cheaper tier is alive: wait for it before spilling.
                        earliest = Some(earliest.map_or(spill_at, |e: Duration| e.min(spill_at)));
                        continue;
                    }
                }
                let est_cost = route.estimate_cost(prompt_tokens, max_tokens);
                if !rt
                    .budgets
                    .allows(&route.provider, est_cost, self.clock.unix_ms())
                {
                    never.push(format!("{}: daily budget reached", route.name()));
                    continue;
                }
                let req = AcquireRequest {
                    provider: &route.provider,
                    model: &route.model,
                    tokens: charged,
                    strategy: job.route.strategy,
                    pinned: pinned.as_ref(),
                    instance: job.route.instance,
                };
                match rt.pool.try_acquire(&req) {
                    Acquire::Granted(permit) => {
                        if let Some(until) = backoff_until.get(permit.key_id()) {
                            if *until > now {
                                cheapest_live.get_or_insert(route.tier);
                                earliest = Some(earliest.map_or(*until, |e| e.min(*until)));
                                rt.pool.report(permit, Fate::NotSent);
                                continue;
                            }
                        }
                        cheapest_live.get_or_insert(route.tier);
                        granted = Some((route.clone(), permit, est_cost));
                        break;
                    }
                    Acquire::Wait { until, .. } => {
                        cheapest_live.get_or_insert(route.tier);
                        earliest = Some(earliest.map_or(until, |e| e.min(until)));
                    }
                    Acquire::Never(why) => never.push(format!("{}: {why}", route.name())),
                }
            }
            let Some((route, permit, est_cost)) = granted else {
                if cheapest_live.is_none() {
                    return fail(
                        branch,
                        FailureKind::NoRoute,
                        format!("no route can serve this job: {}", never.join("; ")),
                        now,
                    );
                }
                let wake = earliest.unwrap_or(deadline).min(deadline);
                let wait_started = now;
                let changed = rt.pool.changed_since(epoch);
                let sleep = self.sleep_until(wake);
                tokio::select! {
                    _ = changed => {},
                    _ = sleep => {},
                }
                metrics::histogram!("llmq_limiter_wait_seconds")
                    .record(self.clock.now().saturating_sub(wait_started).as_secs_f64());
                continue;
            };

            // One upstream call on this key.
            let key_id = permit.key_id().clone();
            rt.budgets
                .reserve(&route.provider, est_cost, self.clock.unix_ms());
            let call_started = self.clock.now();
            let span = tracing::info_span!("call", provider = %route.provider, model = %route.model, key = %key_id);
            let outcome = self
                .call(rt, &route, job, permit.secret())
                .instrument(span)
                .await
                .map(|mut p| {
                    // Upstream messages sometimes quote the key ("Incorrect API key
                    // provided: sk-…"): never let it into results or logs.
                    p.message = p
                        .message
                        .map(|m| redact(&m, permit.secret(), permit.masked()));
                    p
                });
            let now = self.clock.now();
            let ms = now.saturating_sub(call_started).as_millis() as u64;
            let outcome_name = match &outcome {
                Ok(p) => p.outcome.name().to_string(),
                Err(CallFailure::Plugin(_)) => "plugin_error".to_string(),
                Err(CallFailure::Network(_)) => "network".to_string(),
            };
            branch.attempts.push(Attempt {
                provider: route.provider.to_string(),
                model: route.model.to_string(),
                key: key_id.to_string(),
                outcome: outcome_name.clone(),
                ms,
            });
            metrics::counter!("llmq_upstream_calls_total",
                "provider" => route.provider.to_string(),
                "key" => key_id.to_string(),
                "outcome" => outcome_name.clone())
            .increment(1);

            let parsed = match outcome {
                Ok(p) => p,
                Err(CallFailure::Plugin(msg)) => {
                    rt.budgets
                        .release(&route.provider, est_cost, self.clock.unix_ms());
                    rt.pool.report(permit, Fate::Untouched);
                    return fail(branch, FailureKind::Upstream, msg, now);
                }
                Err(CallFailure::Network(msg)) => {
                    rt.budgets
                        .release(&route.provider, est_cost, self.clock.unix_ms());
                    rt.pool.report(permit, Fate::Transient);
                    transient_tries += 1;
                    last_upstream_error = Some(msg.clone());
                    if transient_tries >= MAX_TRANSIENT_TRIES {
                        return fail(
                            branch,
                            FailureKind::Exhausted,
                            format!("{transient_tries} transient failures; last: {msg}"),
                            now,
                        );
                    }
                    backoff_until.insert(key_id, now + backoff(transient_tries));
                    continue;
                }
            };
            rt.pool.observe(&key_id, &parsed.limits);
            let message = parsed.message.clone().unwrap_or_default();
            match parsed.outcome {
                Outcome::Success {
                    text,
                    usage,
                    finish_reason: _,
                } => {
                    let cost = route.cost(usage.input_tokens, usage.output_tokens);
                    rt.budgets
                        .settle(&route.provider, est_cost, cost, self.clock.unix_ms());
                    rt.pool.report(
                        permit,
                        Fate::Success {
                            usage_in: usage.input_tokens,
                            usage_out: usage.output_tokens,
                            cost_usd: cost,
                        },
                    );
                    metrics::counter!("llmq_tokens_total", "provider" => route.provider.to_string(), "direction" => "input").increment(usage.input_tokens);
                    metrics::counter!("llmq_tokens_total", "provider" => route.provider.to_string(), "direction" => "output").increment(usage.output_tokens);
                    metrics::counter!("llmq_cost_usd_micros_total", "provider" => route.provider.to_string()).increment((cost * 1e6) as u64);
                    branch.status = Status::Succeeded;
                    branch.output = Some(text);
                    branch.usage = Some(UsageOut {
                        input_tokens: usage.input_tokens,
                        output_tokens: usage.output_tokens,
                    });
                    branch.cost_usd = cost;
                    branch.key = Some(key_id);
                    branch.route = Some(route);
                    branch.duration_ms = now.saturating_sub(started).as_millis() as u64;
                    return branch;
                }
                Outcome::RateLimited { retry_after_ms } => {
                    rt.budgets
                        .release(&route.provider, est_cost, self.clock.unix_ms());
                    tracing::warn!(key = %key_id, retry_after_ms, "upstream 429: cooling key down");
                    rt.pool.report(
                        permit,
                        Fate::RateLimited {
                            retry_after: retry_after_ms.map(Duration::from_millis),
                        },
                    );
                    last_upstream_error = Some(format!("rate limited: {message}"));
                }
                Outcome::QuotaExhausted | Outcome::AuthFailed => {
                    rt.budgets
                        .release(&route.provider, est_cost, self.clock.unix_ms());
                    let kind = parsed.outcome.name();
                    tracing::warn!(key = %key_id, outcome = kind, "key disabled");
                    rt.pool.report(
                        permit,
                        Fate::Disabled {
                            reason: format!("{kind}: {message}"),
                        },
                    );
                    last_upstream_error = Some(format!("{kind}: {message}"));
                }
                Outcome::Transient => {
                    rt.budgets
                        .release(&route.provider, est_cost, self.clock.unix_ms());
                    rt.pool.report(permit, Fate::Transient);
                    transient_tries += 1;
                    last_upstream_error = Some(format!("transient: {message}"));
                    if transient_tries >= MAX_TRANSIENT_TRIES {
                        return fail(
                            branch,
                            FailureKind::Exhausted,
                            format!(
                                "{transient_tries} transient upstream failures; last: {message}"
                            ),
                            now,
                        );
                    }
                    backoff_until.insert(key_id, now + backoff(transient_tries));
                }
                Outcome::ModelNotFound => {
                    rt.budgets
                        .release(&route.provider, est_cost, self.clock.unix_ms());
                    rt.pool.report(permit, Fate::Untouched);
                    let name = route.name();
                    routes.retain(|r| r.name() != name);
                    last_upstream_error = Some(format!("{name}: model not found: {message}"));
                    if routes.is_empty() {
                        return fail(
                            branch,
                            FailureKind::NoRoute,
                            format!("model not found upstream: {message}"),
                            now,
                        );
                    }
                }
                Outcome::InvalidRequest | Outcome::ContextTooLong => {
                    rt.budgets
                        .release(&route.provider, est_cost, self.clock.unix_ms());
                    rt.pool.report(permit, Fate::Untouched);
                    let kind = parsed.outcome.name();
                    return fail(
                        branch,
                        FailureKind::InvalidRequest,
                        format!("{kind} from {}: {message}", route.name()),
                        now,
                    );
                }
            }
        }
    }

    async fn sleep_until(&self, wake: Duration) {
        let now = self.clock.now();
        tokio::time::sleep(wake.saturating_sub(now).max(Duration::from_millis(1))).await;
    }

    /// prepare → send → parse for one key.
    async fn call(
        &self,
        rt: &Runtime,
        route: &Route,
        job: &Job,
        secret: Option<&str>,
    ) -> Result<llmq_sdk::Parsed, CallFailure> {
        let plugin = rt
            .plugins
            .get(&route.plugin)
            .map_err(|e| CallFailure::Plugin(e.to_string()))?;
        let input = PrepareInput {
            request: ChatRequest {
                model: route.model.to_string(),
                messages: job.messages.clone(),
                max_tokens: job.max_tokens,
                temperature: job.temperature,
                json: job.require.contains(&crate::job::Capability::Json),
            },
            api_key: secret.map(str::to_string),
            provider: ProviderInfo {
                name: route.info.name.clone(),
                base_url: route.info.base_url.clone(),
                options: route.info.options.clone(),
            },
        };
        let request = plugin
            .prepare(&input)
            .map_err(|e| CallFailure::Plugin(e.to_string()))?;
        let clock = self.clock.clone();
        let response = self
            .upstream
            .send(&request, move || clock.unix_ms())
            .await
            .map_err(|e| CallFailure::Network(e.to_string()))?;
        plugin
            .parse(&response)
            .map_err(|e| CallFailure::Plugin(e.to_string()))
    }
}

enum CallFailure {
    /// The plugin panicked, refused or returned garbage: fails the job.
    Plugin(String),
    /// No HTTP response: transient.
    Network(String),
}

/// Replaces every occurrence of the secret with its masked form.
pub fn redact(message: &str, secret: Option<&str>, masked: &str) -> String {
    match secret {
        Some(s) if s.len() >= 4 && message.contains(s) => message.replace(s, masked),
        _ => message.to_string(),
    }
}

fn backoff(tries: u32) -> Duration {
    TRANSIENT_BACKOFF * 2u32.saturating_pow(tries.saturating_sub(1).min(10))
}

fn branch_to_result(job: &Job, b: Branch) -> JobResult {
    JobResult {
        id: job.id.clone(),
        status: b.status,
        output: b.output,
        provider: b.route.as_ref().map(|r| r.provider.to_string()),
        model: b.route.as_ref().map(|r| r.model.to_string()),
        key: b.key.map(|k| k.to_string()),
        tier: b.route.as_ref().map(|r| r.tier),
        usage: b.usage,
        cost_usd: b.cost_usd,
        attempts: b.attempts,
        queued_ms: 0,
        duration_ms: b.duration_ms,
        finished_at: crate::job::now_rfc3339(),
        error: b.error,
        metadata: None,
        responses: None,
        successful: None,
        failed: None,
    }
}

/// Aggregates fan-out branches: succeeded when at least one model succeeded.
fn fan_out_result(job: &Job, branches: Vec<Branch>) -> JobResult {
    let successful = branches
        .iter()
        .filter(|b| b.status == Status::Succeeded)
        .count() as u32;
    let failed = branches.len() as u32 - successful;
    let mut attempts = Vec::new();
    let mut usage = UsageOut::default();
    let mut cost = 0.0;
    let responses = branches
        .into_iter()
        .map(|b| {
            attempts.extend(b.attempts.iter().cloned());
            if let Some(u) = b.usage {
                usage.input_tokens += u.input_tokens;
                usage.output_tokens += u.output_tokens;
            }
            cost += b.cost_usd;
            ModelResponse {
                model: b.model_asked,
                status: b.status,
                output: b.output,
                provider: b.route.as_ref().map(|r| r.provider.to_string()),
                key: b.key.map(|k| k.to_string()),
                tier: b.route.as_ref().map(|r| r.tier),
                usage: b.usage,
                cost_usd: b.cost_usd,
                duration_ms: b.duration_ms,
                attempts: b.attempts,
                error: b.error,
            }
        })
        .collect::<Vec<_>>();
    let status = if successful > 0 {
        Status::Succeeded
    } else {
        Status::Failed
    };
    JobResult {
        id: job.id.clone(),
        status,
        output: None,
        provider: None,
        model: None,
        key: None,
        tier: None,
        usage: Some(usage),
        cost_usd: cost,
        attempts,
        queued_ms: 0,
        duration_ms: 0,
        finished_at: crate::job::now_rfc3339(),
        error: (successful == 0).then(|| ResultError {
            kind: FailureKind::Exhausted,
            message: format!("all {failed} models failed"),
        }),
        metadata: None,
        responses: Some(responses),
        successful: Some(successful),
        failed: Some(failed),
    }
}

/// The queue's handle on the executor.
pub struct ExecutorHandler(pub Arc<Executor>);

impl JobHandler for ExecutorHandler {
    fn run(&self, job: Job, ctx: JobContext) -> BoxFuture<'static, Disposition> {
        let this = self.0.clone();
        Box::pin(async move {
            if this.test_hooks
                && job
                    .metadata
                    .as_ref()
                    .and_then(|m| m.get("llmq_test"))
                    .and_then(|v| v.as_str())
                    == Some("crash")
            {
                tracing::error!(job = %job.id, "test hook: crashing the worker");
                std::process::abort();
            }
            let span =
                tracing::info_span!("job", id = %job.id, lane = %ctx.lane, attempt = ctx.attempt);
            let result = this.execute(&job, &ctx).instrument(span).await;
            metrics::counter!("llmq_jobs_total", "lane" => ctx.lane.clone(), "outcome" => result.status.as_str())
                .increment(1);
            Disposition::Done(result)
        })
    }
}
