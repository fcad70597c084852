//! The router: which (provider, model) routes may serve a job, and in what
//! order to try them.
//!
//! A [`RouteTable`] is built once from the config (and the set of providers
//! that have keys) and shared behind an `Arc`. [`RouteTable::plan`] filters
//! its routes by the job's model, capabilities, context size, tier, cost and
//! pins, then orders them (cheapest tier first, or by explicit priority).
//! Budgets and key availability are run-time matters of the executor.

use crate::config::{Config, ModelConfig, Price, ProviderConfig, RouteOrder};
use crate::job::{Capability, Job, Tier};
use llmq_sdk::estimate::{prompt_tokens, DEFAULT_MAX_TOKENS};
use llmq_sdk::ProviderInfo;
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::sync::Arc;

/// One (provider, model) pair a job can be sent to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    /// Provider name, e.g. `groq`.
    pub provider: String,
    /// Plugin that speaks this provider's protocol, e.g. `openai`.
    pub plugin: String,
    /// The model id on the wire.
    pub model: String,
    /// Other names of the model.
    pub aliases: Vec<String>,
    /// The model's tier, else the provider's.
    pub tier: Tier,
    /// USD per million tokens.
    pub price: Price,
    pub capabilities: Vec<Capability>,
    /// Context window in tokens; `None` when unknown (never excluded for size).
    pub context: Option<u64>,
    /// The model's priority, else the provider's (for `order = "priority"`).
    pub priority: Option<i64>,
    /// Name, base URL and options, as handed to the plugin.
    pub info: ProviderInfo,
    /// The provider needs no key (one anonymous slot).
    pub keyless: bool,
}

impl Route {
    fn new(name: &str, p: &ProviderConfig, m: &ModelConfig) -> Route {
        let mut capabilities = m.capabilities.clone();
        capabilities.sort();
        capabilities.dedup();
        Route {
            provider: name.to_string(),
            plugin: p.plugin.clone(),
            model: m.id.clone(),
            aliases: m.aliases.clone(),
            tier: m.tier.unwrap_or(p.tier),
            price: m.price,
            capabilities,
            context: m.context,
            priority: m.priority.or(p.priority),
            info: ProviderInfo {
                name: name.to_string(),
                base_url: p.base_url.clone(),
                options: p.options.clone(),
            },
            keyless: p.keyless,
        }
    }

    /// `provider/model`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.provider, self.model)
    }

    /// The estimated cost in USD of a call: the prompt at the input price
    /// plus all of `max_tokens` at the output price.
    pub fn estimate_cost(&self, prompt_tokens: u64, max_tokens: u64) -> f64 {
        self.cost(prompt_tokens, max_tokens)
    }

    /// The cost in USD of real usage.
    pub fn cost(&self, usage_in: u64, usage_out: u64) -> f64 {
        (usage_in as f64 * self.price.input + usage_out as f64 * self.price.output) / 1_000_000.0
    }

    pub fn has(&self, cap: Capability) -> bool {
        self.capabilities.contains(&cap)
    }

    /// True when `name` (an id or alias) names this route's model.
    fn is_named(&self, name: &str) -> bool {
        self.model == name || self.aliases.iter().any(|a| a == name)
    }
}

/// Why a job has no route at all. The message says which constraint ruled
/// out the last candidates.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct NoRoute {
    pub message: String,
    /// The routes that matched the model but were excluded, with reasons.
    pub excluded: Vec<(String, String)>,
}

/// The routes to try for one job (or one fan-out branch), best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub routes: Vec<Arc<Route>>,
    /// `(route name, reason)` for routes that matched the model but not the job.
    pub excluded: Vec<(String, String)>,
    /// Estimated prompt tokens of the job.
    pub prompt_tokens: u64,
    /// `max_tokens` of the job, or the default.
    pub max_tokens: u64,
}

impl NoRoute {
    /// A refusal before any route was excluded.
    fn bare(message: String) -> NoRoute {
        NoRoute {
            message,
            excluded: Vec::new(),
        }
    }
}

/// The candidates of a plan while its filters run, with what each dropped.
struct Filter {
    candidates: Vec<Arc<Route>>,
    excluded: Vec<(String, String)>,
}

impl Filter {
    /// Drops the candidates `reason` gives a reason for (recording it) and
    /// returns the candidates from before.
    fn stage(&mut self, reason: impl Fn(&Route) -> Option<String>) -> Vec<Arc<Route>> {
        let before = self.candidates.clone();
        let excluded = &mut self.excluded;
        self.candidates.retain(|r| match reason(r) {
            Some(why) => {
                excluded.push((r.name(), why));
                false
            }
            None => true,
        });
        before
    }

    /// `Err` with `message` and the exclusions so far when no candidate is left.
    fn nonempty(&self, message: impl FnOnce() -> String) -> Result<(), NoRoute> {
        if self.candidates.is_empty() {
            return Err(NoRoute {
                message: message(),
                excluded: self.excluded.clone(),
            });
        }
        Ok(())
    }

    /// Routes that lack a capability the job needs.
    fn capabilities(&mut self, needed: &[Capability], model_label: &str) -> Result<(), NoRoute> {
        let before = self.stage(|r: &Route| {
            let missing: Vec<&str> = needed
                .iter()
                .filter(|c| !r.has(**c))
                .map(|c| c.as_str())
                .collect();
            (!missing.is_empty()).then(|| format!("lacks {}", missing.join(", ")))
        });
        self.nonempty(|| {
            let caps: Vec<&str> = needed.iter().map(|c| c.as_str()).collect();
            let partial: Vec<&str> = needed
                .iter()
                .filter(|c| before.iter().any(|r| r.has(**c)))
                .map(|c| c.as_str())
                .collect();
            if needed.len() > 1 && !partial.is_empty() {
                format!(
                    "no route has all of {} for {model_label} (some have {})",
                    caps.join(" + "),
                    partial.join(", ")
                )
            } else {
                format!(
                    "no route has capability {} for {model_label}",
                    caps.join(" + ")
                )
            }
        })
    }

    /// Routes whose context window is smaller than prompt + max_tokens.
    fn context(&mut self, prompt: u64, max_tokens: u64) -> Result<(), NoRoute> {
        let need = prompt + max_tokens;
        let before = self.stage(|r: &Route| match r.context {
            Some(c) if c < need => Some(format!("context {c} < ~{need} tokens needed")),
            _ => None,
        });
        self.nonempty(|| {
            let largest = before
                .iter()
                .filter_map(|r| r.context.map(|c| (c, r.name())))
                .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)));
            let (c, name) = largest.unwrap_or_default();
            format!(
                "prompt needs ~{need} tokens (~{prompt} prompt + {max_tokens} max_tokens); largest context among matching models is {c} ({name})"
            )
        })
    }

    /// Routes above the job's `max_tier`.
    fn tier(&mut self, max_tier: Tier) -> Result<(), NoRoute> {
        let before = self.stage(|r: &Route| {
            (r.tier > max_tier).then(|| {
                format!(
                    "tier {} above max_tier {}",
                    r.tier.as_str(),
                    max_tier.as_str()
                )
            })
        });
        self.nonempty(|| {
            let cheapest = before.iter().map(|r| r.tier).min().unwrap_or(Tier::Paid);
            format!(
                "max_tier {} excludes every matching route (the cheapest tier that fits is {})",
                max_tier.as_str(),
                cheapest.as_str()
            )
        })
    }

    /// Routes whose estimated cost is over the job's `max_cost_usd`.
    fn cost(&mut self, max_cost: f64, prompt: u64, max_tokens: u64) -> Result<(), NoRoute> {
        let before = self.stage(|r: &Route| {
            let est = r.estimate_cost(prompt, max_tokens);
            (est > max_cost).then(|| format!("est. cost ${est:.6} over max_cost_usd ${max_cost}"))
        });
        self.nonempty(|| {
            let cheapest = before
                .iter()
                .map(|r| (r.estimate_cost(prompt, max_tokens), r.name()))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            let (est, name) = cheapest.unwrap_or_default();
            format!(
                "max_cost_usd ${max_cost} excludes every matching route (cheapest estimate ${est:.6} on {name})"
            )
        })
    }
}

/// All routes of the enabled providers that have keys. Build once, share
/// with `Arc`.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    order: RouteOrder,
    /// Routes of providers that cannot be used, with why (no keys, disabled).
    unusable: Vec<(Arc<Route>, String)>,
    /// All provider names in the config.
    providers: BTreeSet<String>,
}

impl RouteTable {
    /// Keeps the enabled providers that are keyless or for which `has_keys`
    /// says at least one key is configured.
    pub fn new(config: &Config, has_keys: impl Fn(&str) -> bool) -> RouteTable {
        let mut routes = Vec::new();
        let mut unusable = Vec::new();
        for (name, p) in &config.providers {
            let why = if !p.enabled {
                Some(format!("provider {name} is disabled in the config"))
            } else if !p.keyless && !has_keys(name) {
                Some(no_keys_message(name, p))
            } else {
                None
            };
            for m in &p.models {
                let route = Arc::new(Route::new(name, p, m));
                match &why {
                    None => routes.push(route),
                    Some(w) => unusable.push((route, w.clone())),
                }
            }
        }
        RouteTable {
            routes,
            order: config.routing.order,
            unusable,
            providers: config.providers.keys().cloned().collect(),
        }
    }

    /// Every usable route, in config order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The usable route of `provider` serving `model` (id or alias).
    pub fn find(&self, provider: &str, model: &str) -> Option<Arc<Route>> {
        self.routes
            .iter()
            .find(|r| r.provider == provider && r.is_named(model))
            .cloned()
    }

    /// The routes for `job`, best first. `model` is the branch's model for a
    /// fan-out job; otherwise `job.model` is used (none = any model).
    ///
    /// The steps, each of which may end the plan with a [`NoRoute`]: the
    /// job's pins, the model, then the capabilities, context window, tier
    /// and cost filters (each records what it drops in `excluded`).
    pub fn plan(&self, job: &Job, model: Option<&str>) -> Result<Plan, NoRoute> {
        let model = model.or(job.model.as_deref());
        let prompt = prompt_tokens(&job.messages);
        let max_tokens = job.max_tokens.map_or(DEFAULT_MAX_TOKENS, u64::from);
        let pin = self.pinned_provider(job)?;
        let (candidates, model_label) = self.model_candidates(model, pin)?;
        let mut f = Filter {
            candidates,
            excluded: Vec::new(),
        };
        f.capabilities(&job.needed_capabilities(), &model_label)?;
        f.context(prompt, max_tokens)?;
        if let Some(max_tier) = job.route.max_tier {
            f.tier(max_tier)?;
        }
        if let Some(max_cost) = job.route.max_cost_usd {
            f.cost(max_cost, prompt, max_tokens)?;
        }
        let Filter {
            mut candidates,
            mut excluded,
        } = f;
        self.note_unusable(model, pin, &mut excluded);
        self.sort(&mut candidates, prompt, max_tokens);
        Ok(Plan {
            routes: candidates,
            excluded,
            prompt_tokens: prompt,
            max_tokens,
        })
    }

    /// The provider the job pins (`route.provider`, or the provider of
    /// `route.key`, whose provider is before '#'), checked to exist and to
    /// have usable routes.
    fn pinned_provider<'j>(&self, job: &'j Job) -> Result<Option<&'j str>, NoRoute> {
        let key_provider = job
            .route
            .key
            .as_deref()
            .map(|k| k.split_once('#').map_or(k, |(p, _)| p));
        if let (Some(p), Some(kp)) = (job.route.provider.as_deref(), key_provider) {
            if p != kp {
                return Err(NoRoute::bare(format!(
                    "route.key {:?} belongs to provider {kp}, but route.provider is {p}",
                    job.route.key.as_deref().unwrap_or_default()
                )));
            }
        }
        let pin = job.route.provider.as_deref().or(key_provider);
        if let Some(p) = pin {
            if !self.providers.contains(p) {
                return Err(NoRoute::bare(format!(
                    "unknown provider {p:?} (known: {})",
                    join(self.providers.iter().map(String::as_str))
                )));
            }
            if !self.routes.iter().any(|r| r.provider == p) {
                let why = self
                    .unusable
                    .iter()
                    .find(|(r, _)| r.provider == p)
                    .map(|(_, w)| w.clone())
                    .unwrap_or_else(|| format!("provider {p} has no models"));
                return Err(NoRoute::bare(why));
            }
        }
        Ok(pin)
    }

    /// The usable routes serving `model` (all for none), kept to the pinned
    /// provider, and how messages name the model.
    fn model_candidates(
        &self,
        model: Option<&str>,
        pin: Option<&str>,
    ) -> Result<(Vec<Arc<Route>>, String), NoRoute> {
        let (mut candidates, model_label) = match model {
            None => (self.routes.clone(), "any model".to_string()),
            Some(name) => {
                let matched = match_model(&self.routes, name);
                if matched.is_empty() {
                    return Err(NoRoute::bare(self.no_model_message(name)));
                }
                (matched, format!("model {name:?}"))
            }
        };
        if let Some(p) = pin {
            candidates.retain(|r| r.provider == p);
            if candidates.is_empty() {
                return Err(NoRoute::bare(format!(
                    "provider {p} (pinned by the job's route) does not serve {model_label}"
                )));
            }
        }
        Ok((candidates, model_label))
    }

    /// Providers without keys (or disabled) that serve the model (any model
    /// when none is asked for): one line per provider, for the operator.
    fn note_unusable(
        &self,
        model: Option<&str>,
        pin: Option<&str>,
        excluded: &mut Vec<(String, String)>,
    ) {
        let mut seen = BTreeSet::new();
        for (r, why) in &self.unusable {
            let named = model.is_none_or(|name| r.is_named(name) || qualified_match(r, name));
            if named && pin.is_none_or(|p| p == r.provider) && seen.insert(r.provider.clone()) {
                excluded.push((format!("{}/*", r.provider), why.clone()));
            }
        }
    }

    fn sort(&self, routes: &mut [Arc<Route>], prompt: u64, max_tokens: u64) {
        let cost = |r: &Route| r.estimate_cost(prompt, max_tokens);
        // Unset priorities sort last.
        let prio = |r: &Route| r.priority.unwrap_or(i64::MAX);
        routes.sort_by(|a, b| {
            let by_cost = || {
                a.tier
                    .cmp(&b.tier)
                    .then_with(|| cost(a).total_cmp(&cost(b)))
            };
            let by_name = || {
                a.provider
                    .cmp(&b.provider)
                    .then_with(|| a.model.cmp(&b.model))
            };
            match self.order {
                RouteOrder::Cost => by_cost()
                    .then_with(|| prio(a).cmp(&prio(b)))
                    .then_with(by_name),
                RouteOrder::Priority => prio(a).cmp(&prio(b)).then_with(by_cost).then_with(by_name),
            }
        });
    }

    /// Why nothing matched model `name`.
    fn no_model_message(&self, name: &str) -> String {
        let unusable: Vec<&(Arc<Route>, String)> = self
            .unusable
            .iter()
            .filter(|(r, _)| r.is_named(name) || qualified_match(r, name))
            .collect();
        if !unusable.is_empty() {
            let mut reasons: Vec<&str> = unusable.iter().map(|(_, w)| w.as_str()).collect();
            reasons.dedup();
            return format!("no usable route for model {name:?}: {}", reasons.join("; "));
        }
        let mut known: BTreeSet<&str> = BTreeSet::new();
        for r in &self.routes {
            known.insert(r.model.as_str());
            known.extend(r.aliases.iter().map(String::as_str));
        }
        const SHOWN: usize = 30;
        let mut list = join(known.iter().copied().take(SHOWN));
        if known.len() > SHOWN {
            let _ = write!(list, ", … and {} more", known.len() - SHOWN);
        }
        if known.is_empty() {
            list = "none: no provider has keys".into();
        }
        format!("no model matches {name:?} (known: {list})")
    }

    /// The plan of `job` (each branch of a fan-out job) as data.
    pub fn explain_data(&self, job: &Job) -> Explain {
        let branches: Vec<Option<String>> = if job.models.is_empty() {
            vec![job.model.clone()]
        } else {
            job.models.iter().cloned().map(Some).collect()
        };
        let needs = job
            .needed_capabilities()
            .iter()
            .map(|c| c.as_str().to_string())
            .collect();
        Explain {
            order: self.order,
            require: needs,
            prompt_tokens: prompt_tokens(&job.messages),
            max_tokens: job.max_tokens.map_or(DEFAULT_MAX_TOKENS, u64::from),
            branches: branches
                .into_iter()
                .map(|m| {
                    let (routes, excluded, error) = match self.plan(job, m.as_deref()) {
                        Ok(plan) => (
                            plan.routes
                                .iter()
                                .enumerate()
                                .map(|(i, r)| ExplainRoute {
                                    rank: i + 1,
                                    route: r.name(),
                                    provider: r.provider.clone(),
                                    model: r.model.clone(),
                                    tier: r.tier,
                                    est_cost_usd: r
                                        .estimate_cost(plan.prompt_tokens, plan.max_tokens),
                                    context: r.context,
                                    capabilities: r
                                        .capabilities
                                        .iter()
                                        .map(|c| c.as_str().to_string())
                                        .collect(),
                                    priority: r.priority,
                                })
                                .collect(),
                            plan.excluded,
                            None,
                        ),
                        Err(e) => (vec![], e.excluded, Some(e.message)),
                    };
                    ExplainBranch {
                        model: m,
                        routes,
                        excluded: excluded
                            .into_iter()
                            .map(|(route, reason)| ExplainExcluded { route, reason })
                            .collect(),
                        error,
                    }
                })
                .collect(),
        }
    }

    /// A human table of the routes `job` would try, and the exclusions with
    /// reasons (what `llmq routes` prints).
    pub fn explain(&self, job: &Job) -> String {
        self.explain_data(job).to_string()
    }
}

/// Routes named by `name`: `provider/model` (id or alias) first; otherwise
/// an id or alias on any provider.
fn match_model(routes: &[Arc<Route>], name: &str) -> Vec<Arc<Route>> {
    let qualified: Vec<Arc<Route>> = routes
        .iter()
        .filter(|r| qualified_match(r, name))
        .cloned()
        .collect();
    if !qualified.is_empty() {
        return qualified;
    }
    routes
        .iter()
        .filter(|r| r.is_named(name))
        .cloned()
        .collect()
}

fn qualified_match(r: &Route, name: &str) -> bool {
    name.strip_prefix(r.provider.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|m| r.is_named(m))
}

fn no_keys_message(name: &str, p: &ProviderConfig) -> String {
    match &p.keys_env {
        Some(e) => format!("no keys configured for provider {name} (set {e}_API_KEY, {e}_API_KEY_<N> or {e}_API_KEYS)"),
        None => format!("no keys configured for provider {name}"),
    }
}

fn join<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// `llmq routes --json` and `GET /v1/routes`: the plan of a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explain {
    pub order: RouteOrder,
    pub require: Vec<String>,
    pub prompt_tokens: u64,
    pub max_tokens: u64,
    /// One per fan-out model; a single one (model or none) otherwise.
    pub branches: Vec<ExplainBranch>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExplainBranch {
    /// The model asked for; `None` = any model.
    pub model: Option<String>,
    pub routes: Vec<ExplainRoute>,
    pub excluded: Vec<ExplainExcluded>,
    /// Why there is no route, when there is none.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExplainRoute {
    pub rank: usize,
    pub route: String,
    pub provider: String,
    pub model: String,
    pub tier: Tier,
    pub est_cost_usd: f64,
    pub context: Option<u64>,
    pub capabilities: Vec<String>,
    pub priority: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExplainExcluded {
    pub route: String,
    pub reason: String,
}

impl fmt::Display for Explain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order = match self.order {
            RouteOrder::Cost => "cost",
            RouteOrder::Priority => "priority",
        };
        let require = if self.require.is_empty() {
            "-".to_string()
        } else {
            self.require.join(",")
        };
        writeln!(
            f,
            "order: {order}   require: {require}   prompt: ~{} tokens   max_tokens: {}",
            self.prompt_tokens, self.max_tokens
        )?;
        for b in &self.branches {
            writeln!(f)?;
            writeln!(f, "model: {}", b.model.as_deref().unwrap_or("(any)"))?;
            if let Some(e) = &b.error {
                writeln!(f, "  no route: {e}")?;
            }
            if !b.routes.is_empty() {
                let width = b
                    .routes
                    .iter()
                    .map(|r| r.route.len())
                    .max()
                    .unwrap_or(5)
                    .max(5);
                writeln!(
                    f,
                    "  {:>4}  {:<width$}  {:<5}  {:>11}  {:>9}  {:>4}  caps",
                    "rank", "route", "tier", "est. cost", "context", "prio"
                )?;
                for r in &b.routes {
                    let context = r.context.map_or("?".to_string(), |c| c.to_string());
                    let prio = r.priority.map_or("-".to_string(), |p| p.to_string());
                    let caps = if r.capabilities.is_empty() {
                        "-".to_string()
                    } else {
                        r.capabilities.join(",")
                    };
                    writeln!(
                        f,
                        "  {:>4}  {:<width$}  {:<5}  {:>11}  {:>9}  {:>4}  {}",
                        r.rank,
                        r.route,
                        r.tier.as_str(),
                        format!("${:.6}", r.est_cost_usd),
                        context,
                        prio,
                        caps
                    )?;
                }
            }
            if !b.excluded.is_empty() {
                writeln!(f, "  excluded:")?;
                let width = b.excluded.iter().map(|e| e.route.len()).max().unwrap_or(0);
                for e in &b.excluded {
                    writeln!(f, "    {:<width$}  {}", e.route, e.reason)?;
                }
            }
        }
        Ok(())
    }
}
