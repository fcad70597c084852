//! The executor runs one job: it asks the router for the routes that fit,
//! asks the key pool for a key that can serve now (cheapest tier first),
//! has the plugin build the request, sends it, has the plugin classify the
//! response, and decides the job's and the key's fate.
//!
//! It owns the *policy* of a job's life; the mechanisms live elsewhere
//! (`router`, `pool`, `limits`, `budget`, `plugin_host`, `upstream`, `queue`).
//!
//! # Steps
//!
//! A job (each fan-out branch) is a small state machine, a loop over named
//! steps in `run_branch`:
//!
//! 1. **plan** (`Tries::plan`): the router's routes for the model, the
//!    job's token estimate and its pinned key, if any.
//! 2. **pick** (`Tries::pick`): the first route, in plan order under the
//!    tier bar, whose budget reserves the estimate and whose pool grants a
//!    key now; or why nothing can serve now (wait) or ever (fail).
//! 3. **wait** (`Executor::wait`): until the earliest time a live route
//!    could serve, or until the pool signals freed capacity; the job's
//!    deadline ends it.
//! 4. **admit** (`Executor::admit`): the cluster gate; a refusal re-plans.
//! 5. **call** (`Executor::call_key`): prepare → send → parse, bounded by
//!    `min(remaining deadline, [upstream] timeout)`; then the reservation is
//!    given back unless the call succeeded, the gate's call is completed
//!    and the attempt recorded.
//! 6. **classify** ([`Failure`], `Tries::apply`): the answer or failure,
//!    classified in one place (`failure`): what it means for the key (its
//!    [`KeyEffect`](crate::failure::KeyEffect), reported as a [`Fate`]) and
//!    for the job: try again (the plan pruned, the key backed off or held),
//!    succeeded, or failed.
//! 7. **settle** (`settle`): the reservation is settled with the real cost
//!    and the key's fate is reported to the pool.
//!
//! From pick to settle every resource is held by an RAII guard (a `Grant`):
//! the budget [`Reservation`], the pool's [`Permit`] and the gate's
//! [`GlobalCall`]. An early return, a panic or the job's future dropped in
//! the middle of its call (the queue's safety net, a shutdown) releases
//! each: the reservation is given back, the permit ends with an unknown
//! fate (its probe freed at once) and the gate's call completes itself as
//! cancelled (its slot stamped at the drop, its probe marker freed).
//!
//! # Policy
//!
//! **Order.** The router's plan is tried in order: cheapest tier first, then
//! cheapest estimate (or explicit priorities with `routing.order =
//! "priority"`). Within a tier the first route whose key can serve *now* is
//! taken; a busy route never makes a job wait while a same-tier route is free.
//!
//! **Spill.** A route is *live* when it could serve later (its keys are busy,
//! cooling down or backing off, or its budget is held by calls in flight),
//! as opposed to never (no keys, all disabled, over its daily budget). The
//! tier of the first live route in plan order (in cost order: the cheapest
//! live tier) is the bar. Routes of a dearer tier are held back until
//! `routing.wait_for_cheaper` has passed since the job (the fan-out branch)
//! started running; after that every route is tried in plan order. A job
//! whose cheaper tier is merely saturated therefore pays at most
//! `wait_for_cheaper` in latency before it spills, and a job whose cheaper
//! tier is dead (no keys, all disabled) spills at once.
//!
//! **Return.** Nothing is sticky: every job (and every retry within a job)
//! plans from scratch, so as soon as the cheaper tier has capacity again new
//! jobs go there. `route.max_tier` removes dearer routes from the plan, so
//! such a job waits for its tier however long the others are saturated (up
//! to its deadline).
//!
//! **Waiting.** When nothing can serve now, the job sleeps until the earliest
//! time any live route could (the limiter's answer, the end of a cooldown or
//! backoff, or the spill time), and wakes earlier when the pool signals that
//! capacity may have been freed ([`KeyPool::changed_since`], with the epoch
//! read *before* trying, so no release is missed). Jobs wait; they fail only
//! at their deadline (`deadline_s`, else `routing.default_deadline`, counted
//! from enqueue), as `deadline`.
//!
//! **Budgets.** A route whose provider has `budget_usd_per_day` is tried
//! only while today's spend plus the reservations of calls in flight plus
//! this job's estimate (prompt + all of `max_tokens`) stays under the cap,
//! checked and reserved in one step. The estimate bounds the bill unless the
//! upstream counts more prompt tokens than llmq estimates, so spend stays
//! under the cap (or over it by at most that error of the calls in flight).
//! When only reservations stand in the way, the route stays live: the job
//! waits, as calls in flight may settle for less. When today's spend alone
//! leaves no room, the route is out for the day: other routes are used if
//! the job has any, and when it has none it fails at once with `no_route`
//! and a message naming the budget that was reached.
//!
//! **Upstream answers.**
//! - `rate_limited` (429): the pool cools the key down for the upstream's
//!   hint (else the configured cooldown) and the job moves to the next key at
//!   once (attempts show `rate_limited`, then the other key's outcome).
//! - `auth_failed`: the key is disabled (and re-probed on schedule); the job
//!   moves on at once.
//! - `quota_exhausted` for the key: likewise, but re-probed at the quota's
//!   `reset` when the provider said (`next_daily`: the provider's next daily
//!   reset), not after `keys.reprobe_interval`.
//! - `quota_exhausted` for one model: only that model is parked on that key
//!   until the reset; the key serves its other models, and routes for the
//!   model use the other keys (or wait like for a cooling key, and say
//!   "quota for model m on key X exhausted until …" at the deadline). The
//!   cluster gate sees the key as untouched.
//! - `request_too_large` (Groq's 413 on TPM): the key is untouched and out
//!   for this job on this route; the job moves on at once to the route's
//!   other keys and the other routes. When every key of every route refused
//!   it, the job fails at once as `invalid_request` with the upstream's message.
//! - `transient` (5xx, network, a body over `[upstream] max_response_bytes`):
//!   the key is backed off for this job (1 s, doubling) while other keys and
//!   routes are tried; after [`MAX_TRANSIENT_TRIES`] the job fails as
//!   `exhausted`.
//! - A TLS/certificate failure: the setup is at fault, not the key (it is
//!   left untouched); the provider's routes are dropped for the job, as all
//!   its keys share its base URL, and when no route is left the job fails
//!   with an `upstream` error naming the provider and the TLS problem.
//! - A call is cut at the job's deadline (it never outlives its job): the
//!   attempt reads `deadline` and the job fails as `deadline`.
//! - `model_not_found`: the route is dropped; `no_route` when none is left.
//! - `context_too_long`: the route and every route with no larger known
//!   context are dropped (the estimate was short); `invalid_request` when
//!   none is left.
//! - `invalid_request`, or a plugin error: the job fails at once.
//!
//! **Fan-out** (`models`): each model runs as its own branch, concurrently,
//! with the policy above and the job's deadline. The job `succeeded` when at
//! least one model succeeded; `responses` has one entry per model (status,
//! output, usage, cost, attempts, error) and `successful`/`failed` count
//! them. When every model failed the job fails as `exhausted`.

use crate::budget::{BudgetCheck, Budgets, Reservation};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::failure::{Answer, CallFailure, Failure, Prune, Retry, Site, Verdict};
use crate::global::{GateError, GlobalCall};
use crate::job::{
    Attempt, FailureKind, FinishReason, Job, JobResult, ModelResponse, ResultError, ResultMessage,
    Status, Tier, UsageOut,
};
use crate::keys::KeyId;
use crate::plugin_host::PluginHost;
use crate::pool::{Acquire, AcquireRequest, Fate, KeyPool, Permit};
use crate::queue::{Disposition, JobContext, JobHandler};
use crate::router::{Route, RouteTable};
use crate::upstream::Upstream;
use futures::future::BoxFuture;
use llmq_sdk::{ChatRequest, ObservedLimits, Outcome, PrepareInput, ProviderInfo};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::Instrument;

/// Transient failures tolerated per job before it fails as `exhausted`.
pub(crate) const MAX_TRANSIENT_TRIES: u32 = 5;
/// First backoff after a transient failure; doubles each time.
pub(crate) const TRANSIENT_BACKOFF: Duration = Duration::from_secs(1);

/// Everything a job needs, swappable as one piece on SIGHUP.
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Arc<RouteTable>,
    pub pool: Arc<KeyPool>,
    pub plugins: Arc<PluginHost>,
    pub budgets: Arc<Budgets>,
    /// The cluster-wide admission gate (`[cluster] enabled`), see `global`.
    pub global: Option<Arc<crate::global::GlobalGate>>,
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
pub(crate) struct Branch {
    pub model_asked: String,
    pub status: Status,
    pub output: Option<String>,
    /// How the call ended (see [`finish_of`]).
    pub finish_reason: Option<FinishReason>,
    pub message: Option<ResultMessage>,
    pub route: Option<Arc<Route>>,
    pub key: Option<KeyId>,
    pub usage: Option<UsageOut>,
    pub cost_usd: f64,
    pub attempts: Vec<Attempt>,
    pub error: Option<ResultError>,
    pub duration_ms: u64,
}

impl Branch {
    /// A branch for `model` that has not succeeded (yet).
    fn new(model: Option<&str>) -> Branch {
        Branch {
            model_asked: model.unwrap_or_default().to_string(),
            status: Status::Failed,
            output: None,
            finish_reason: None,
            message: None,
            route: None,
            key: None,
            usage: None,
            cost_usd: 0.0,
            attempts: vec![],
            error: None,
            duration_ms: 0,
        }
    }

    /// Records a successful call: its answer, usage, cost and key.
    fn succeeded(
        &mut self,
        text: String,
        finish: Option<FinishReason>,
        refusal: Option<String>,
        usage: &llmq_sdk::Usage,
        cost: f64,
        key_id: &KeyId,
    ) {
        self.status = Status::Succeeded;
        self.answer(text, finish, refusal);
        self.usage = Some(UsageOut {
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
        });
        self.cost_usd = cost;
        self.key = Some(key_id.clone());
    }

    /// Records the model's answer: its text (`output`, `message.content`),
    /// its refusal and how it ended.
    fn answer(&mut self, text: String, finish: Option<FinishReason>, refusal: Option<String>) {
        self.finish_reason = finish_of(finish, refusal.as_deref());
        self.message = Some(ResultMessage::assistant(&text, refusal));
        self.output = Some(text);
    }
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
    pub(crate) fn runtime(&self) -> Arc<Runtime> {
        match self.runtime.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in a reloaded runtime. Jobs in flight keep the one they started with.
    pub(crate) fn replace_runtime(&self, runtime: Runtime) {
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
        let deadline_after = job.deadline_or(rt.config.routing.default_deadline);
        let waited =
            Duration::from_millis(self.clock.unix_ms().saturating_sub(ctx.enqueued_unix_ms));
        let deadline = started.saturating_add(deadline_after.saturating_sub(waited));

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

    /// One model's life, as a loop over the named steps of the module doc:
    /// **plan** once, then until the job ends: **pick** a key (or **wait**
    /// for one), **admit** it at the cluster gate, **call** the upstream,
    /// **classify** the answer and **settle** the key and the budget.
    async fn run_branch(
        &self,
        rt: &Runtime,
        job: &Job,
        model: Option<&str>,
        deadline: Duration,
    ) -> Branch {
        let started = self.clock.now();
        let mut branch = Branch::new(model);
        let fail = |mut b: Branch, kind: FailureKind, msg: String, now: Duration| {
            b.error = Some(ResultError { kind, message: msg });
            b.duration_ms = now.saturating_sub(started).as_millis() as u64;
            b
        };
        let mut tries = match Tries::plan(rt, job, model, started) {
            Ok(t) => t,
            Err((kind, msg)) => return fail(branch, kind, msg, self.clock.now()),
        };
        loop {
            let now = self.clock.now();
            if now >= deadline {
                let msg = tries.deadline_message(rt);
                return fail(branch, FailureKind::Deadline, msg, now);
            }
            let grant = match tries.pick(rt, job, &self.clock, now) {
                Pick::Granted(grant) => *grant,
                Pick::Wait { epoch, earliest } => {
                    let wake = earliest.unwrap_or(deadline).min(deadline);
                    self.wait(rt, epoch, wake).await;
                    continue;
                }
                Pick::Fail((kind, msg)) => return fail(branch, kind, msg, now),
            };
            let grant = match self.admit(rt, grant).await {
                Ok(Some(grant)) => grant,
                Ok(None) => continue,
                Err((permit, e)) => {
                    // The gate could not be asked: nothing was sent.
                    let failure = Failure::of_gate(&e);
                    let next = tries.apply(rt, permit.key_id(), &failure, now);
                    settle(rt, permit, None, failure.key.fate());
                    match next {
                        Next::Fail(kind, msg) => return fail(branch, kind, msg, now),
                        Next::Again | Next::Succeeded => continue,
                    }
                }
            };
            // One upstream call on this key, after `now - waiting_since` of waiting.
            metrics::histogram!(crate::metrics::LIMITER_WAIT_SECONDS)
                .record(now.saturating_sub(tries.waiting_since).as_secs_f64());
            let called = self
                .call_key(rt, job, grant, deadline, &mut branch.attempts)
                .await;
            tries.waiting_since = called.ended;
            let now = called.ended;
            let Called {
                route,
                permit,
                key_id,
                reservation,
                limits,
                verdict,
                ..
            } = called;
            if let Some(limits) = limits {
                observe(rt, &key_id, limits);
            }
            let (fate, next) = match verdict {
                Verdict::Answered(answer) => (
                    succeeded(&mut branch, &route, &key_id, answer),
                    Next::Succeeded,
                ),
                Verdict::Failed(failure) => {
                    log_failure(&key_id, &failure);
                    let next = tries.apply(rt, &key_id, &failure, now);
                    (failure.key.fate(), next)
                }
            };
            settle(rt, permit, reservation, fate);
            match next {
                Next::Again => {}
                Next::Succeeded => {
                    branch.route = Some(route);
                    branch.duration_ms = now.saturating_sub(started).as_millis() as u64;
                    return branch;
                }
                Next::Fail(kind, msg) => return fail(branch, kind, msg, now),
            }
        }
    }

    /// **Wait**: until `wake`, or earlier when the pool signals that capacity
    /// may have been freed since `epoch` (read before the keys were tried).
    async fn wait(&self, rt: &Runtime, epoch: u64, wake: Duration) {
        let changed = rt.pool.changed_since(epoch);
        let sleep = self.sleep_until(wake);
        tokio::select! {
            _ = changed => {},
            _ = sleep => {},
        }
    }

    /// **Admit**: the cluster gate (`[cluster] enabled`) keeps the key's
    /// limits, state and probation across every daemon on this Redis
    /// (global.rs). `None` when it refused: the job re-plans at once, and
    /// the grant's guards give back the permit and the reservation. When
    /// the gate cannot be asked, the permit comes back with the gate's
    /// error, to be classified like any failure (the reservation is given
    /// back).
    async fn admit(
        &self,
        rt: &Runtime,
        mut grant: Grant,
    ) -> Result<Option<Grant>, (Permit, GateError)> {
        let Some(gate) = &rt.global else {
            return Ok(Some(grant));
        };
        let Some((permit, call)) = gate.admit_permit(&rt.pool, grant.permit).await? else {
            return Ok(None);
        };
        grant.permit = permit;
        grant.gate = Some(call);
        Ok(Some(grant))
    }

    /// **Call**: prepare → send → parse on the granted key, bounded by the
    /// job's deadline; then the reservation is given back unless the call
    /// succeeded (before the key's report wakes the jobs that wait for
    /// budget), the gate's call is completed and the attempt recorded.
    async fn call_key(
        &self,
        rt: &Runtime,
        job: &Job,
        grant: Grant,
        deadline: Duration,
        attempts: &mut Vec<Attempt>,
    ) -> Called {
        let Grant {
            route,
            permit,
            reservation,
            gate: gate_call,
        } = grant;
        let key_id = permit.key_id().clone();
        let call_started = self.clock.now();
        let span = tracing::info_span!("call", provider = %route.provider, model = %route.model, key = %key_id);
        let raw = self
            .call(rt, &route, job, permit.secret(), deadline)
            .instrument(span)
            .await;
        let site = Site {
            route: &route,
            key: &key_id,
            reset_at: None,
        };
        let (limits, verdict) = match raw {
            Ok(mut p) => {
                // Upstream messages sometimes quote the key ("Incorrect API key
                // provided: sk-…"): never let it into results or logs.
                let message = p
                    .message
                    .map(|m| redact(&m, permit.secret(), permit.masked()))
                    .unwrap_or_default();
                // A per-day quota comes back at the provider's next daily
                // reset: one instant for the pool and the cluster gate alike.
                rt.pool.resolve_reset(&route.provider, &mut p.outcome);
                let reset_at = quota_reset_at(rt, &route.provider, &p.outcome);
                let site = Site {
                    reset_at: reset_at.as_deref(),
                    ..site
                };
                let verdict = Failure::of_outcome(p.outcome, &message, site);
                (Some(p.limits), verdict)
            }
            Err(failure) => (None, Verdict::Failed(Failure::of_call(&failure, site))),
        };
        let ended = self.clock.now();
        // Nothing is billed unless the call succeeded.
        let reservation = match &verdict {
            Verdict::Answered(_) => Some(reservation),
            Verdict::Failed(_) => {
                reservation.release();
                None
            }
        };
        if let (Some(gate), Some(call)) = (&rt.global, gate_call) {
            let fate = match &verdict {
                Verdict::Answered(a) => Fate::Success {
                    usage_in: a.usage.input_tokens,
                    usage_out: a.usage.output_tokens,
                    cost_usd: 0.0,
                },
                Verdict::Failed(f) => f.key.gate_fate(),
            };
            gate.complete(call, &fate).await;
        }
        let outcome_name = match &verdict {
            Verdict::Answered(_) => "success".to_string(),
            Verdict::Failed(f) => f.outcome.to_string(),
        };
        attempts.push(Attempt {
            provider: route.provider.to_string(),
            model: route.model.to_string(),
            key: key_id.to_string(),
            outcome: outcome_name.clone(),
            ms: ended.saturating_sub(call_started).as_millis() as u64,
        });
        metrics::counter!(crate::metrics::UPSTREAM_CALLS_TOTAL,
            "provider" => route.provider.to_string(),
            "key" => key_id.to_string(),
            "outcome" => outcome_name)
        .increment(1);
        Called {
            route,
            permit,
            key_id,
            reservation,
            limits,
            verdict,
            ended,
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
        deadline: Duration,
    ) -> Result<llmq_sdk::Parsed, CallFailure> {
        let plugin = rt.plugins.handle(&route.plugin)?;
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
        let request = plugin.prepare(&input).await?;
        let clock = self.clock.clone();
        // A call never outlives its job.
        let remaining = deadline.saturating_sub(self.clock.now());
        let response = self
            .upstream
            .send(request, remaining, move || clock.unix_ms())
            .await?;
        Ok(plugin.parse(&response).await?)
    }
}

/// A key granted for one call. Each resource is a guard: dropped (an early
/// return, a panic, the job's future dropped mid-call) it is released.
struct Grant {
    route: Arc<Route>,
    /// The pool's permit: dropped unreported, an unknown fate (probe freed).
    permit: Permit,
    /// The budget reservation: dropped unsettled, given back.
    reservation: Reservation,
    /// The cluster gate's call, once admitted: dropped uncompleted, it
    /// completes itself as cancelled.
    gate: Option<GlobalCall>,
}

/// A finished call, with the guards left to settle.
struct Called {
    route: Arc<Route>,
    permit: Permit,
    key_id: KeyId,
    /// Still held only when the call succeeded (to be settled).
    reservation: Option<Reservation>,
    /// The limits the upstream's answer showed, when it answered.
    limits: Option<ObservedLimits>,
    /// The answer, or the failure classified.
    verdict: Verdict,
    ended: Duration,
}

/// What **pick** found.
enum Pick {
    Granted(Box<Grant>),
    /// Nothing can serve now: wait until `earliest` (else the deadline) or
    /// until the pool changes after `epoch`.
    Wait {
        epoch: u64,
        earliest: Option<Duration>,
    },
    /// Nothing will ever serve this job.
    Fail((FailureKind, String)),
}

/// What **classify** decided for the job.
enum Next {
    /// Try again (another key, route or later).
    Again,
    Succeeded,
    Fail(FailureKind, String),
}

/// **Settle**: the key's fate goes to the pool (after the reservation was
/// settled with the real cost, or given back).
fn settle(rt: &Runtime, permit: Permit, reservation: Option<Reservation>, fate: Fate) {
    if let (Some(r), Fate::Success { cost_usd, .. }) = (reservation, &fate) {
        r.settle(*cost_usd);
    }
    rt.pool.report(permit, fate);
}

/// What one branch has learned between tries: the routes left, the keys
/// backing off or refusing the request, the last upstream error.
struct Tries {
    routes: Vec<Arc<Route>>,
    prompt_tokens: u64,
    max_tokens: u64,
    /// Tokens charged up front per call (prompt + all of `max_tokens`).
    charged: u64,
    /// When dearer tiers may be tried.
    spill_at: Duration,
    pinned: Option<KeyId>,
    transient_tries: u32,
    /// Since when the job has been looking for its next call (the limiter
    /// wait histogram gets one observation per call).
    waiting_since: Duration,
    backoff_until: HashMap<KeyId, Duration>,
    /// Keys pruned from a route for this job ([`Prune::KeyOnRoute`]: the
    /// request is too large for them), per route: the pool skips them.
    too_large: HashMap<String, Vec<KeyId>>,
    /// How the job ends when every key of every route refused it.
    too_large_end: Option<(FailureKind, String)>,
    /// Routes not to ask again before a time (all their ready keys back off).
    held: HashMap<String, Duration>,
    last_upstream_error: Option<String>,
}

impl Tries {
    /// **Plan**: the router's routes for the model, and the job's estimate.
    fn plan(
        rt: &Runtime,
        job: &Job,
        model: Option<&str>,
        started: Duration,
    ) -> Result<Tries, (FailureKind, String)> {
        let plan = rt
            .router
            .plan(job, model)
            .map_err(|e| (FailureKind::NoRoute, e.to_string()))?;
        let pinned = match job.route.key.as_deref().map(str::parse::<KeyId>) {
            None => None,
            Some(Ok(id)) => Some(id),
            Some(Err(_)) => {
                return Err((
                    FailureKind::InvalidJob,
                    "route.key must look like provider#N (e.g. groq#2)".to_string(),
                ))
            }
        };
        let prompt_tokens = llmq_sdk::estimate::prompt_tokens(&job.messages);
        let max_tokens = job
            .max_tokens
            .map(u64::from)
            .unwrap_or(llmq_sdk::estimate::DEFAULT_MAX_TOKENS);
        Ok(Tries {
            routes: plan.routes.clone(),
            prompt_tokens,
            max_tokens,
            charged: prompt_tokens.saturating_add(max_tokens),
            spill_at: started.saturating_add(rt.config.routing.wait_for_cheaper),
            pinned,
            transient_tries: 0,
            waiting_since: started,
            backoff_until: HashMap::new(),
            too_large: HashMap::new(),
            too_large_end: None,
            held: HashMap::new(),
            last_upstream_error: None,
        })
    }

    /// The job's error when its deadline passes between calls.
    fn deadline_message(&self, rt: &Runtime) -> String {
        // Keys that could serve but for a model's exhausted quota.
        let mut why: String = self
            .routes
            .iter()
            .flat_map(|r| rt.pool.model_parks(&r.provider, &r.model))
            .map(|p| format!("; {p}"))
            .collect();
        if let Some(e) = &self.last_upstream_error {
            why.push_str(&format!("; last upstream error: {e}"));
        }
        format!("deadline reached before any key could serve the job{why}")
    }

    /// **Pick**: the first route in plan order whose budget and pool can
    /// serve now; the tier of the first live route is the bar, dearer tiers
    /// only after `spill_at` (see the module doc).
    fn pick(&mut self, rt: &Runtime, job: &Job, clock: &SharedClock, now: Duration) -> Pick {
        let epoch = rt.pool.epoch();
        let mut never: Vec<String> = Vec::new();
        let mut earliest: Option<Duration> = None;
        let mut bar: Option<Tier> = None;
        for route in &self.routes {
            if let Some(bar) = bar {
                if route.tier > bar && now < self.spill_at {
                    // A cheaper tier is alive: wait for it before spilling.
                    note(&mut earliest, self.spill_at);
                    continue;
                }
            }
            if let Some(until) = (!self.held.is_empty())
                .then(|| self.held.get(&route.name()).copied())
                .flatten()
            {
                if until > now {
                    bar.get_or_insert(route.tier);
                    note(&mut earliest, until);
                    continue;
                }
            }
            let est_cost = route.estimate_cost(self.prompt_tokens, self.max_tokens);
            // Reserved here when it fits; the guard gives it back at the end
            // of this iteration unless a key is granted.
            let reservation = match rt.budgets.hold(&route.provider, est_cost, clock) {
                Ok(r) => r,
                Err(BudgetCheck::Reached { cap, spent }) => {
                    never.push(format!(
                        "{}: daily budget of ${cap} for provider {} reached (${spent:.6} spent today; this job needs up to ${est_cost:.6})",
                        route.name(),
                        route.provider
                    ));
                    continue;
                }
                Err(_) => {
                    // Calls in flight hold the rest of the budget; they may
                    // settle for less. Their reports wake us.
                    bar.get_or_insert(route.tier);
                    continue;
                }
            };
            let req = AcquireRequest {
                provider: &route.provider,
                model: &route.model,
                tokens: self.charged,
                strategy: job.route.strategy,
                pinned: self.pinned.as_ref(),
                instance: job.route.instance,
            };
            let refused: &[KeyId] = if self.too_large.is_empty() {
                &[]
            } else {
                self.too_large.get(&route.name()).map_or(&[], Vec::as_slice)
            };
            let backing_off = |id: &KeyId| self.backoff_until.get(id).copied().filter(|u| *u > now);
            let grant = |permit| {
                Pick::Granted(Box::new(Grant {
                    route: route.clone(),
                    permit,
                    reservation,
                    gate: None,
                }))
            };
            match rt.pool.try_acquire_except(&req, refused) {
                Acquire::Granted(permit) => {
                    bar.get_or_insert(route.tier);
                    let Some(until) = backing_off(permit.key_id()) else {
                        return grant(permit);
                    };
                    // This key failed transiently for this job: ask for
                    // another one while it is held, then give it back.
                    let other = rt.pool.try_acquire_except(&req, refused);
                    rt.pool.report(permit, Fate::NotSent);
                    let mut hold = until;
                    match other {
                        Acquire::Granted(p) if backing_off(p.key_id()).is_none() => {
                            return grant(p);
                        }
                        Acquire::Granted(p) => rt.pool.report(p, Fate::NotSent),
                        Acquire::Wait { until, .. } => hold = hold.min(until),
                        Acquire::Never(_) => {}
                    }
                    // Don't ask this route again before then: each give-back
                    // wakes every waiter.
                    self.held.insert(route.name(), hold);
                    note(&mut earliest, hold);
                }
                Acquire::Wait { until, .. } => {
                    bar.get_or_insert(route.tier);
                    note(&mut earliest, until);
                }
                Acquire::Never(why) => never.push(format!("{}: {why}", route.name())),
            }
            // No key: the reservation is given back here (the guard drops).
        }
        if bar.is_none() {
            return Pick::Fail(self.dead_end(never));
        }
        Pick::Wait { epoch, earliest }
    }

    /// Why no route is live (none can serve, now or later).
    fn dead_end(&self, never: Vec<String>) -> (FailureKind, String) {
        if let Some(end) = &self.too_large_end {
            if self
                .routes
                .iter()
                .all(|r| self.too_large.contains_key(&r.name()))
            {
                // Every key of every route said the request is larger than
                // it may ever take: no wait or retry can help.
                return end.clone();
            }
        }
        (
            FailureKind::NoRoute,
            format!("no route can serve this job: {}", never.join("; ")),
        )
    }

    /// **Classify**: a failure's retry applied to the job's plan (the
    /// route or provider pruned, the key backed off for the job or held for
    /// every job, or another key asked at once); the job's next step.
    fn apply(&mut self, rt: &Runtime, key_id: &KeyId, failure: &Failure, now: Duration) -> Next {
        if let Some(note) = &failure.note {
            self.last_upstream_error = Some(note.clone());
        }
        let fail = || Next::Fail(failure.kind, failure.reason.clone());
        match &failure.retry {
            Retry::Never => fail(),
            Retry::AnotherKey => Next::Again,
            Retry::After(pause) => {
                hold(rt, key_id, *pause);
                Next::Again
            }
            Retry::Backoff => {
                self.transient_tries += 1;
                if self.transient_tries >= MAX_TRANSIENT_TRIES {
                    let msg = format!("{} {}", self.transient_tries, failure.reason);
                    return Next::Fail(failure.kind, msg);
                }
                self.backoff_until
                    .insert(key_id.clone(), now + backoff(self.transient_tries));
                Next::Again
            }
            Retry::Prune(Prune::KeyOnRoute { route, key }) => {
                self.too_large
                    .entry(route.clone())
                    .or_default()
                    .push(key.clone());
                self.too_large_end = Some((failure.kind, failure.reason.clone()));
                Next::Again
            }
            Retry::Prune(prune) => {
                self.routes.retain(|r| prune.keeps(r));
                if self.routes.is_empty() {
                    fail()
                } else {
                    Next::Again
                }
            }
        }
    }
}

/// The limits an answer showed, for the pool (through the cluster gate's
/// view when there is one).
fn observe(rt: &Runtime, key_id: &KeyId, limits: ObservedLimits) {
    let observed = match &rt.global {
        Some(gate) => gate.observed(key_id, &limits),
        None => limits,
    };
    rt.pool.observe(key_id, &observed);
}

/// A successful answer fills the branch; the key's fate.
fn succeeded(branch: &mut Branch, route: &Route, key_id: &KeyId, answer: Answer) -> Fate {
    let Answer {
        text,
        usage,
        finish_reason,
        refusal,
    } = answer;
    let cost = route.cost(usage.input_tokens, usage.output_tokens);
    let provider = route.provider.to_string();
    metrics::counter!(crate::metrics::TOKENS_TOTAL, "provider" => provider.clone(), "direction" => "input").increment(usage.input_tokens);
    metrics::counter!(crate::metrics::TOKENS_TOTAL, "provider" => provider.clone(), "direction" => "output").increment(usage.output_tokens);
    metrics::counter!(crate::metrics::COST_USD_MICROS_TOTAL, "provider" => provider)
        .increment((cost * 1e6) as u64);
    branch.succeeded(text, finish_reason, refusal, &usage, cost, key_id);
    Fate::Success {
        usage_in: usage.input_tokens,
        usage_out: usage.output_tokens,
        cost_usd: cost,
    }
}

/// When an exhausted quota comes back (RFC 3339), when the provider said.
fn quota_reset_at(rt: &Runtime, provider: &str, outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::QuotaExhausted { reset: Some(r), .. } => Some(crate::calendar::rfc3339_ms(
            rt.pool.quota_reset_ms(provider, r),
        )),
        _ => None,
    }
}

/// Holds the key back for every job of this daemon for `pause`.
fn hold(rt: &Runtime, key_id: &KeyId, pause: Duration) {
    let ms = (pause.as_micros() as u64).div_ceil(1000).max(1);
    rt.pool.observe(
        key_id,
        &ObservedLimits {
            requests_remaining: Some(0),
            requests_reset_ms: Some(ms),
            ..Default::default()
        },
    );
}

/// What the operator sees of a failure's effect on the key or the plan.
fn log_failure(key_id: &KeyId, failure: &Failure) {
    use crate::failure::KeyEffect;
    let outcome = failure.outcome;
    match &failure.key {
        KeyEffect::CoolDown { hint } => {
            let retry_after_ms = hint.map(|h| h.as_millis() as u64);
            tracing::warn!(key = %key_id, retry_after_ms, "upstream 429: cooling key down");
        }
        KeyEffect::Disable { .. } => tracing::warn!(key = %key_id, outcome, "key disabled"),
        KeyEffect::Park { model, .. } => {
            tracing::warn!(key = %key_id, model, "model parked on key: quota exhausted")
        }
        _ => {}
    }
    if let Retry::Prune(Prune::Provider(provider)) = &failure.retry {
        tracing::warn!(provider = %provider, outcome, "provider dropped for this job");
    }
}

/// Replaces every occurrence of the secret with its masked form.
pub(crate) fn redact(message: &str, secret: Option<&str>, masked: &str) -> String {
    match secret {
        Some(s) if s.len() >= 4 && message.contains(s) => message.replace(s, masked),
        _ => message.to_string(),
    }
}

/// The finish reason a result shows: the plugin's, except that an answer
/// with refusal text is a `refusal`, never a plain `stop` (OpenAI sends
/// `finish_reason: "stop"` beside `message.refusal`).
pub(crate) fn finish_of(
    reason: Option<FinishReason>,
    refusal: Option<&str>,
) -> Option<FinishReason> {
    match (reason, refusal) {
        (None | Some(FinishReason::Stop), Some(_)) => Some(FinishReason::Refusal),
        (r, _) => r,
    }
}

/// Lowers `earliest` to `t`.
fn note(earliest: &mut Option<Duration>, t: Duration) {
    *earliest = Some(earliest.map_or(t, |e| e.min(t)));
}

fn backoff(tries: u32) -> Duration {
    TRANSIENT_BACKOFF * 2u32.saturating_pow(tries.saturating_sub(1).min(10))
}

fn branch_to_result(job: &Job, b: Branch) -> JobResult {
    JobResult {
        id: job.id.clone(),
        status: b.status,
        output: b.output,
        finish_reason: b.finish_reason,
        message: b.message,
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
                finish_reason: b.finish_reason,
                message: b.message,
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
        finish_reason: None,
        message: None,
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
pub(crate) struct ExecutorHandler(pub Arc<Executor>);

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
            metrics::counter!(crate::metrics::JOBS_TOTAL, "lane" => ctx.lane.clone(), "outcome" => result.status.as_str())
                .increment(1);
            Disposition::Done(result)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(body: &str) -> Job {
        crate::job::parse_job(body.as_bytes(), 4096).expect("job parses")
    }

    fn answered(text: &str, finish: Option<FinishReason>, refusal: Option<&str>) -> Branch {
        let mut b = Branch::new(Some("m"));
        b.status = Status::Succeeded;
        b.duration_ms = 1;
        b.answer(text.into(), finish, refusal.map(String::from));
        b
    }

    #[test]
    fn a_refusal_reaches_the_result_as_finish_reason_and_message_refusal() {
        let j = job(r#"{"id":"r1","messages":[{"role":"user","content":"hi"}]}"#);
        // OpenAI sends finish_reason "stop" beside message.refusal: never a plain stop.
        let b = answered(
            "",
            Some(FinishReason::Stop),
            Some("I can't help with that."),
        );
        let v = serde_json::to_value(branch_to_result(&j, b)).unwrap();
        assert_eq!(v["status"], "succeeded");
        assert_eq!(v["finish_reason"], "refusal");
        assert_eq!(
            v["message"],
            json!({"role": "assistant", "content": null, "refusal": "I can't help with that."})
        );
        assert_eq!(v["output"], "");
        // Anthropic's stop_reason "refusal" with no text, and no reason at all.
        let b = answered("", None, Some("no"));
        let v = serde_json::to_value(branch_to_result(&j, b)).unwrap();
        assert_eq!(v["finish_reason"], "refusal");
    }

    #[test]
    fn length_and_content_filter_finishes_are_reported_as_such() {
        let j = job(r#"{"id":"r2","messages":[{"role":"user","content":"hi"}]}"#);
        let b = answered("cut sh", Some(FinishReason::Length), None);
        let v = serde_json::to_value(branch_to_result(&j, b)).unwrap();
        assert_eq!(v["status"], "succeeded");
        assert_eq!(v["finish_reason"], "length");
        assert_eq!(
            v["message"],
            json!({"role": "assistant", "content": "cut sh", "refusal": null})
        );
        assert_eq!(v["output"], "cut sh");
        let b = answered("", Some(FinishReason::ContentFilter), None);
        let v = serde_json::to_value(branch_to_result(&j, b)).unwrap();
        assert_eq!(v["finish_reason"], "content_filter");
        assert_eq!(v["message"]["content"], serde_json::Value::Null);
        // A provider that says nothing: no finish_reason rather than a guessed "stop".
        let b = answered("hello", None, None);
        let v = serde_json::to_value(branch_to_result(&j, b)).unwrap();
        assert!(v.get("finish_reason").is_none(), "{v}");
        // The result reads back as it was written.
        let r: JobResult = serde_json::from_value(v).unwrap();
        assert_eq!(r.message.unwrap().content.as_deref(), Some("hello"));
    }

    #[test]
    fn each_fan_out_response_carries_its_own_finish_and_message() {
        let j =
            job(r#"{"id":"r3","models":["a","b"],"messages":[{"role":"user","content":"hi"}]}"#);
        let mut a = answered("long answ", Some(FinishReason::Length), None);
        a.model_asked = "a".into();
        let mut b = answered("", Some(FinishReason::Refusal), Some("I won't."));
        b.model_asked = "b".into();
        let v = serde_json::to_value(fan_out_result(&j, vec![a, b])).unwrap();
        assert_eq!(v["responses"][0]["finish_reason"], "length");
        assert_eq!(v["responses"][0]["message"]["content"], "long answ");
        assert_eq!(v["responses"][1]["finish_reason"], "refusal");
        assert_eq!(v["responses"][1]["message"]["refusal"], "I won't.");
    }

    #[test]
    fn finish_of_never_turns_a_refusal_into_stop() {
        assert_eq!(
            finish_of(Some(FinishReason::Stop), None),
            Some(FinishReason::Stop)
        );
        assert_eq!(finish_of(None, None), None);
        assert_eq!(
            finish_of(Some(FinishReason::Stop), Some("x")),
            Some(FinishReason::Refusal)
        );
        assert_eq!(
            finish_of(Some(FinishReason::ContentFilter), Some("x")),
            Some(FinishReason::ContentFilter)
        );
    }
}
