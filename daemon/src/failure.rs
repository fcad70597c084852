//! The one failure model of a call, in the spirit of pingora's `Error`: a
//! failed call is classified once, here, into a [`Failure`] that says
//!
//! - whether retrying may help, and where ([`Retry`]): never, the same key
//!   after a backoff, the same key after a pause, another key, or another
//!   route after pruning the plan ([`Prune`]);
//! - what it means for the key ([`KeyEffect`]): keep it, cool it down, park
//!   a model on it until a reset, disable it, or give the call back unsent;
//! - the job's failure kind and message when the job ends on it.
//!
//! Every source of failure is mapped in this module and nowhere else:
//! upstream answers ([`Failure::of_outcome`]), calls that got no answer to
//! parse ([`Failure::of_call`]: the plugin's failures and network errors)
//! and the cluster gate's failures ([`Failure::of_gate`]). The executor
//! applies a `Failure` generically (its key effect through
//! [`pool::Fate`](crate::pool::Fate), its retry and pruning to the job's
//! plan); it does not match on where a failure came from.

use crate::global::{GateError, UNAVAILABLE_RETRY};
use crate::job::FailureKind;
use crate::keys::KeyId;
use crate::plugin_host::PluginCallError;
use crate::pool::{model_key, Fate, AUTH_FAILED, QUOTA_EXHAUSTED};
use crate::router::Route;
use crate::upstream::NetError;
use llmq_sdk::{FinishReason, Outcome, QuotaReset, QuotaScope, Usage};
use std::time::Duration;

/// A call that got no answer to parse.
#[derive(Debug, thiserror::Error)]
pub enum CallFailure {
    /// The plugin is not loaded, panicked, refused, timed out or returned
    /// garbage.
    #[error(transparent)]
    Plugin(#[from] PluginCallError),
    /// No usable HTTP response.
    #[error(transparent)]
    Network(#[from] NetError),
}

/// A failed call, classified.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The attempt's `outcome` (results, metrics).
    pub outcome: &'static str,
    /// Whether and where retrying may help.
    pub retry: Retry,
    /// What the failure means for the key.
    pub key: KeyEffect,
    /// The job's failure kind when it ends on this failure.
    pub kind: FailureKind,
    /// The job's error message when it ends on this failure (after
    /// [`Retry::Backoff`], prefixed with the number of tries).
    pub reason: String,
    /// What the job remembers as its last upstream error (quoted by a
    /// deadline that comes later); `None` leaves the last one standing.
    pub note: Option<String>,
}

/// Whether and where retrying may help.
#[derive(Debug, Clone, PartialEq)]
pub enum Retry {
    /// Nothing can help: the job fails at once.
    Never,
    /// The same key may serve again after a backoff for this job (1 s,
    /// doubling) while its other keys and routes are tried; the job fails
    /// after `MAX_TRANSIENT_TRIES` such failures.
    Backoff,
    /// The same key after a pause, for every job of this daemon (the
    /// cluster gate could not be asked).
    After(Duration),
    /// Another key at once: this one is cooled down, disabled or parked.
    AnotherKey,
    /// Another route (or key) after the plan is pruned; the job fails when
    /// nothing is left.
    Prune(Prune),
}

/// How a failure prunes the job's plan.
#[derive(Debug, Clone, PartialEq)]
pub enum Prune {
    /// Drop this route (`route.name()`).
    Route(String),
    /// Drop every route of this provider (all its keys share its base URL).
    Provider(String),
    /// Drop this route and every route whose known context is at most this
    /// one's (routes of unknown context stay).
    ContextAtMost { route: String, context: Option<u64> },
    /// This key is out for this job on this route; the job fails when every
    /// key of every route left refused.
    KeyOnRoute { route: String, key: KeyId },
}

impl Prune {
    /// Whether `route` stays in the plan ([`Prune::KeyOnRoute`] keeps
    /// every route).
    pub fn keeps(&self, route: &Route) -> bool {
        match self {
            Prune::Route(name) => route.name() != *name,
            Prune::Provider(provider) => route.provider != *provider,
            Prune::ContextAtMost {
                route: name,
                context,
            } => {
                route.name() != *name
                    && match (context, route.context) {
                        (Some(l), Some(c)) => c > *l,
                        _ => true,
                    }
            }
            Prune::KeyOnRoute { .. } => true,
        }
    }
}

/// What a failure means for the key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyEffect {
    /// The key answered and is fine; only the request was refused (a probe
    /// of the key succeeds).
    Keep,
    /// Says nothing about the key either way (5xx, network): counted as a
    /// failure, a probe is inconclusive.
    Unknown,
    /// Cool the key down for the upstream's hint, else the configured
    /// cooldown (429).
    CoolDown { hint: Option<Duration> },
    /// Park `model` on the key until `reset` (else `keys.reprobe_interval`);
    /// the key serves its other models.
    Park {
        model: String,
        reason: String,
        reset: Option<QuotaReset>,
    },
    /// Disable the key; `cause` is the reason the cluster gate shares.
    Disable {
        cause: &'static str,
        reason: String,
        reprobe: Reprobe,
    },
    /// The call never reached the provider: its capacity is given back and
    /// a probe settles nothing.
    GiveBack,
}

/// When a disabled key is tried again.
#[derive(Debug, Clone, PartialEq)]
pub enum Reprobe {
    /// After `keys.reprobe_interval`.
    OnSchedule,
    /// At the quota's reset when the provider said, else on schedule.
    AtReset(Option<QuotaReset>),
}

impl KeyEffect {
    /// The key's fate for the local pool.
    pub fn fate(&self) -> Fate {
        match self.clone() {
            KeyEffect::Keep => Fate::Untouched,
            KeyEffect::Unknown => Fate::Transient,
            KeyEffect::CoolDown { hint } => Fate::RateLimited { retry_after: hint },
            KeyEffect::Park {
                model,
                reason,
                reset,
            } => Fate::ModelQuota {
                model,
                reason,
                reset,
            },
            KeyEffect::Disable {
                reason,
                reprobe: Reprobe::OnSchedule,
                ..
            } => Fate::Disabled { reason },
            KeyEffect::Disable {
                reason,
                reprobe: Reprobe::AtReset(reset),
                ..
            } => Fate::QuotaExhausted { reason, reset },
            KeyEffect::GiveBack => Fate::NotSent,
        }
    }

    /// The key's fate for the cluster gate: a disabled key's reason is its
    /// cause only (the upstream's message stays local).
    pub fn gate_fate(&self) -> Fate {
        match (self, self.fate()) {
            (KeyEffect::Disable { cause, .. }, Fate::Disabled { .. }) => Fate::Disabled {
                reason: (*cause).into(),
            },
            (KeyEffect::Disable { cause, .. }, Fate::QuotaExhausted { reset, .. }) => {
                Fate::QuotaExhausted {
                    reason: (*cause).into(),
                    reset,
                }
            }
            (_, Fate::ModelQuota { model, reset, .. }) => Fate::ModelQuota {
                model,
                reason: QUOTA_EXHAUSTED.into(),
                reset,
            },
            (_, fate) => fate,
        }
    }
}

/// How a call ended: an answer, or a failure classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Answered(Answer),
    Failed(Failure),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub usage: Usage,
    pub finish_reason: Option<FinishReason>,
    pub refusal: Option<String>,
}

/// Where a call was made: what the classification names.
#[derive(Debug, Clone, Copy)]
pub struct Site<'a> {
    pub route: &'a Route,
    pub key: &'a KeyId,
    /// When an exhausted quota comes back (RFC 3339), when the provider said.
    pub reset_at: Option<&'a str>,
}

impl Failure {
    fn new(outcome: &'static str, retry: Retry, key: KeyEffect, kind: FailureKind) -> Failure {
        Failure {
            outcome,
            retry,
            key,
            kind,
            reason: String::new(),
            note: None,
        }
    }

    /// The job's message when it ends here.
    fn because(mut self, reason: String) -> Failure {
        self.reason = reason;
        self
    }

    /// The job's message when it ends here, also remembered as its last
    /// upstream error.
    fn noted(self, reason: String) -> Failure {
        let note = reason.clone();
        self.noting(reason, note)
    }

    /// The job's message when it ends here, and what it remembers.
    fn noting(mut self, reason: String, note: String) -> Failure {
        self.reason = reason;
        self.note = Some(note);
        self
    }

    /// The plugin's reading of an answer: the answer, or what failed.
    /// `message` is the upstream's (redacted) message.
    pub fn of_outcome(outcome: Outcome, message: &str, at: Site<'_>) -> Verdict {
        let name = at.route.name();
        let key = at.key;
        let kind = outcome.name();
        let f = match outcome {
            Outcome::Success {
                text,
                usage,
                finish_reason,
                refusal,
            } => {
                return Verdict::Answered(Answer {
                    text,
                    usage,
                    finish_reason,
                    refusal,
                })
            }
            Outcome::RateLimited { retry_after_ms } => {
                let hint = retry_after_ms.map(Duration::from_millis);
                Failure::new(
                    kind,
                    Retry::AnotherKey,
                    KeyEffect::CoolDown { hint },
                    FailureKind::Deadline,
                )
                .noted(format!("rate limited: {message}"))
            }
            Outcome::QuotaExhausted { reset, scope } => quota(at, message, reset, scope),
            Outcome::AuthFailed => {
                let reason = format!("{kind}: {message}");
                let effect = KeyEffect::Disable {
                    cause: AUTH_FAILED,
                    reason: reason.clone(),
                    reprobe: Reprobe::OnSchedule,
                };
                Failure::new(kind, Retry::AnotherKey, effect, FailureKind::Deadline)
                    .noted(reason)
            }
            Outcome::Transient => Failure::new(
                kind,
                Retry::Backoff,
                KeyEffect::Unknown,
                FailureKind::Exhausted,
            )
            .noting(
                format!("transient upstream failures; last: {message}"),
                format!("transient: {message}"),
            ),
            Outcome::ModelNotFound => Failure::new(
                kind,
                Retry::Prune(Prune::Route(name.clone())),
                KeyEffect::Keep,
                FailureKind::NoRoute,
            )
            .noting(
                format!("model not found upstream: {message}"),
                format!("{name}: model not found: {message}"),
            ),
            // Larger than this key may take in any window (Groq's 413 on
            // TPM): the key is out for this job on this route.
            Outcome::RequestTooLarge => Failure::new(
                kind,
                Retry::Prune(Prune::KeyOnRoute {
                    route: name.clone(),
                    key: key.clone(),
                }),
                KeyEffect::Keep,
                FailureKind::InvalidRequest,
            )
            .noting(
                format!("request_too_large: every key of every route refused the request as too large; last: {name} on {key}: {message}"),
                format!("{name}: request too large for {key}: {message}"),
            ),
            // The prompt is longer than estimated: only a larger context
            // can help.
            Outcome::ContextTooLong => Failure::new(
                kind,
                Retry::Prune(Prune::ContextAtMost {
                    route: name.clone(),
                    context: at.route.context,
                }),
                KeyEffect::Keep,
                FailureKind::InvalidRequest,
            )
            .noting(
                format!("context_too_long from {name}: {message}"),
                format!("{name}: context too long: {message}"),
            ),
            Outcome::InvalidRequest => {
                let why = format!("{kind} from {name}: {message}");
                Failure::new(kind, Retry::Never, KeyEffect::Keep, FailureKind::InvalidRequest)
                    .because(why)
            }
        };
        Verdict::Failed(f)
    }

    /// A call that got no answer to parse.
    pub fn of_call(failure: &CallFailure, at: Site<'_>) -> Failure {
        match failure {
            CallFailure::Plugin(e) => Failure::of_plugin(e),
            CallFailure::Network(e) => Failure::of_network(e, at),
        }
    }

    /// The plugin failed (not loaded, panicked, refused, timed out): the
    /// key is untouched and the job fails.
    pub fn of_plugin(e: &PluginCallError) -> Failure {
        let why = e.to_string();
        Failure::new(
            "plugin_error",
            Retry::Never,
            KeyEffect::Keep,
            FailureKind::Upstream,
        )
        .because(why)
    }

    /// No usable HTTP response. A TLS failure is the setup's fault, not the
    /// key's, and the request never reached the provider: the call counts
    /// as not sent (it neither uses the key's capacity nor settles a probe)
    /// and the provider is dropped for the job. A request the plugin built
    /// that cannot be sent is the plugin's bug: not sent, never retried.
    pub fn of_network(e: &NetError, at: Site<'_>) -> Failure {
        let msg = e.to_string();
        let route = at.route;
        match e {
            NetError::Deadline(_) => {
                let why = format!(
                    "deadline reached during the call to {} on {}",
                    route.name(),
                    at.key
                );
                Failure::new(
                    "deadline",
                    Retry::Never,
                    KeyEffect::Unknown,
                    FailureKind::Deadline,
                )
                .because(why)
            }
            NetError::BadRequest(_) => {
                let why = format!(
                    "plugin {} built a request that cannot be sent: {msg}",
                    route.plugin
                );
                Failure::new(
                    "plugin_error",
                    Retry::Never,
                    KeyEffect::GiveBack,
                    FailureKind::Upstream,
                )
                .because(why)
            }
            NetError::Tls(_) => {
                let why = format!(
                    "provider {} ({}): {msg}; check [upstream] ca_file or SSL_CERT_FILE/SSL_CERT_DIR",
                    route.provider, route.info.base_url
                );
                Failure::new(
                    "tls_error",
                    Retry::Prune(Prune::Provider(route.provider.clone())),
                    KeyEffect::GiveBack,
                    FailureKind::Upstream,
                )
                .noted(why)
            }
            NetError::Timeout(_)
            | NetError::Connect(_)
            | NetError::TooLarge { .. }
            | NetError::Other(_) => {
                let outcome = match e {
                    NetError::TooLarge { .. } => "response_too_large",
                    _ => "network",
                };
                Failure::new(
                    outcome,
                    Retry::Backoff,
                    KeyEffect::Unknown,
                    FailureKind::Exhausted,
                )
                .noting(format!("transient failures; last: {msg}"), msg)
            }
        }
    }

    /// The cluster gate could not be asked (Redis unavailable, an answer it
    /// cannot read): the call is given back unsent and the key is asked
    /// again after [`UNAVAILABLE_RETRY`]; other keys serve meanwhile.
    pub fn of_gate(e: &GateError) -> Failure {
        let why = format!("cluster gate unavailable: {e}");
        let outcome = match e {
            GateError::Redis(_) => "gate_unavailable",
            GateError::Protocol(_) => "gate_protocol",
        };
        Failure::new(
            outcome,
            Retry::After(UNAVAILABLE_RETRY),
            KeyEffect::GiveBack,
            FailureKind::Deadline,
        )
        .because(why)
    }
}

/// A `quota_exhausted` answer: the key disabled until the quota's reset,
/// or only the model parked on it.
fn quota(at: Site<'_>, message: &str, reset: Option<QuotaReset>, scope: QuotaScope) -> Failure {
    let key = at.key;
    let until_text = at
        .reset_at
        .map(|u| format!(" until {u}"))
        .unwrap_or_default();
    let reason = format!("{QUOTA_EXHAUSTED}: {message}");
    let (effect, note) = match scope {
        QuotaScope::Key => (
            KeyEffect::Disable {
                cause: QUOTA_EXHAUSTED,
                reason: reason.clone(),
                reprobe: Reprobe::AtReset(reset),
            },
            format!("quota_exhausted on key {key}{until_text}: {message}"),
        ),
        QuotaScope::Model(named) => {
            // The model this call asked for is what cannot be served; the
            // quota normally names it.
            let route_model = model_key(&at.route.model);
            let model = if model_key(&named) == route_model {
                model_key(&named)
            } else {
                route_model
            }
            .to_string();
            let note =
                format!("quota for model {model} on key {key} exhausted{until_text}: {message}");
            let effect = KeyEffect::Park {
                model,
                reason: reason.clone(),
                reset,
            };
            (effect, note)
        }
    };
    Failure::new(
        QUOTA_EXHAUSTED,
        Retry::AnotherKey,
        effect,
        FailureKind::Deadline,
    )
    .noted(note)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Price;
    use crate::job::Tier;
    use llmq_sdk::host::CallError;
    use llmq_sdk::ProviderInfo;
    use std::path::PathBuf;

    fn route(provider: &str, model: &str, context: Option<u64>) -> Route {
        Route {
            provider: provider.into(),
            plugin: "openai".into(),
            model: model.into(),
            aliases: vec![],
            tier: Tier::Free,
            price: Price {
                input: 0.0,
                output: 0.0,
            },
            capabilities: vec![],
            context,
            priority: None,
            info: ProviderInfo {
                name: provider.into(),
                base_url: "https://api.example.com/v1".into(),
                options: Default::default(),
            },
            keyless: false,
        }
    }

    fn key() -> KeyId {
        "groq#2".parse().expect("a key id")
    }

    /// The mapping's answer, less the messages (checked separately).
    fn shape(f: &Failure) -> (&'static str, Retry, KeyEffect, FailureKind) {
        (f.outcome, f.retry.clone(), f.key.clone(), f.kind)
    }

    fn outcome(o: Outcome, reset_at: Option<&str>) -> Failure {
        let r = route("groq", "llama", Some(8192));
        let k = key();
        let at = Site {
            route: &r,
            key: &k,
            reset_at,
        };
        match Failure::of_outcome(o, "upstream says no", at) {
            Verdict::Failed(f) => f,
            Verdict::Answered(a) => panic!("a failure, not {a:?}"),
        }
    }

    fn network(e: NetError) -> Failure {
        let r = route("groq", "llama", Some(8192));
        let k = key();
        let at = Site {
            route: &r,
            key: &k,
            reset_at: None,
        };
        Failure::of_call(&CallFailure::Network(e), at)
    }

    #[test]
    fn every_upstream_outcome_maps_to_its_retry_key_effect_and_job_failure() {
        let r = route("groq", "llama", Some(8192));
        let k = key();
        let at = Site {
            route: &r,
            key: &k,
            reset_at: None,
        };
        let usage = llmq_sdk::Usage {
            input_tokens: 3,
            output_tokens: 2,
        };
        let success = Outcome::Success {
            text: "hi".into(),
            usage,
            finish_reason: Some(FinishReason::Stop),
            refusal: None,
        };
        let Verdict::Answered(answer) = Failure::of_outcome(success, "", at) else {
            panic!("a success is an answer");
        };
        assert_eq!((answer.text.as_str(), answer.usage), ("hi", usage));

        let mut seen: Vec<&str> = vec!["success"];
        for (o, want) in key_outcomes().into_iter().chain(request_outcomes()) {
            let name = o.name();
            let f = outcome(o, None);
            assert_eq!(shape(&f), want, "{name}");
            assert!(f.reason.contains("upstream says no"), "{name}: {f:?}");
            seen.push(name);
        }
        // Every outcome the SDK knows is in the table.
        for kind in Outcome::KINDS {
            assert!(seen.contains(&kind), "{kind} is not mapped in this test");
        }
    }

    type Shape = (&'static str, Retry, KeyEffect, FailureKind);

    /// The outcomes that say something about the key.
    fn key_outcomes() -> Vec<(Outcome, Shape)> {
        let reset = Some(QuotaReset::At { unix_ms: 1_000 });
        vec![
            (
                Outcome::RateLimited {
                    retry_after_ms: Some(1500),
                },
                (
                    "rate_limited",
                    Retry::AnotherKey,
                    KeyEffect::CoolDown {
                        hint: Some(Duration::from_millis(1500)),
                    },
                    FailureKind::Deadline,
                ),
            ),
            (
                Outcome::RateLimited {
                    retry_after_ms: None,
                },
                (
                    "rate_limited",
                    Retry::AnotherKey,
                    KeyEffect::CoolDown { hint: None },
                    FailureKind::Deadline,
                ),
            ),
            (
                Outcome::QuotaExhausted {
                    reset: reset.clone(),
                    scope: QuotaScope::Key,
                },
                (
                    "quota_exhausted",
                    Retry::AnotherKey,
                    KeyEffect::Disable {
                        cause: QUOTA_EXHAUSTED,
                        reason: "quota_exhausted: upstream says no".into(),
                        reprobe: Reprobe::AtReset(reset.clone()),
                    },
                    FailureKind::Deadline,
                ),
            ),
            (
                // The quota names the route's model (with a `models/` prefix).
                Outcome::QuotaExhausted {
                    reset: None,
                    scope: QuotaScope::Model("models/llama".into()),
                },
                (
                    "quota_exhausted",
                    Retry::AnotherKey,
                    KeyEffect::Park {
                        model: "llama".into(),
                        reason: "quota_exhausted: upstream says no".into(),
                        reset: None,
                    },
                    FailureKind::Deadline,
                ),
            ),
            (
                // It names another model: the one this call asked for is parked.
                Outcome::QuotaExhausted {
                    reset: reset.clone(),
                    scope: QuotaScope::Model("gemma".into()),
                },
                (
                    "quota_exhausted",
                    Retry::AnotherKey,
                    KeyEffect::Park {
                        model: "llama".into(),
                        reason: "quota_exhausted: upstream says no".into(),
                        reset: reset.clone(),
                    },
                    FailureKind::Deadline,
                ),
            ),
            (
                Outcome::AuthFailed,
                (
                    "auth_failed",
                    Retry::AnotherKey,
                    KeyEffect::Disable {
                        cause: AUTH_FAILED,
                        reason: "auth_failed: upstream says no".into(),
                        reprobe: Reprobe::OnSchedule,
                    },
                    FailureKind::Deadline,
                ),
            ),
        ]
    }

    /// The outcomes that say something about the request (or nothing).
    fn request_outcomes() -> Vec<(Outcome, Shape)> {
        vec![
            (
                Outcome::InvalidRequest,
                (
                    "invalid_request",
                    Retry::Never,
                    KeyEffect::Keep,
                    FailureKind::InvalidRequest,
                ),
            ),
            (
                Outcome::ContextTooLong,
                (
                    "context_too_long",
                    Retry::Prune(Prune::ContextAtMost {
                        route: "groq/llama".into(),
                        context: Some(8192),
                    }),
                    KeyEffect::Keep,
                    FailureKind::InvalidRequest,
                ),
            ),
            (
                Outcome::RequestTooLarge,
                (
                    "request_too_large",
                    Retry::Prune(Prune::KeyOnRoute {
                        route: "groq/llama".into(),
                        key: key(),
                    }),
                    KeyEffect::Keep,
                    FailureKind::InvalidRequest,
                ),
            ),
            (
                Outcome::ModelNotFound,
                (
                    "model_not_found",
                    Retry::Prune(Prune::Route("groq/llama".into())),
                    KeyEffect::Keep,
                    FailureKind::NoRoute,
                ),
            ),
            (
                Outcome::Transient,
                (
                    "transient",
                    Retry::Backoff,
                    KeyEffect::Unknown,
                    FailureKind::Exhausted,
                ),
            ),
        ]
    }

    #[test]
    fn an_upstream_failure_names_the_route_the_key_and_the_message() {
        let reset = Some(QuotaReset::At { unix_ms: 1_000 });
        // The messages a job ends with, and what a later deadline quotes.
        let f = outcome(Outcome::Transient, None);
        assert_eq!(
            f.reason,
            "transient upstream failures; last: upstream says no"
        );
        assert_eq!(f.note.as_deref(), Some("transient: upstream says no"));
        let f = outcome(Outcome::ContextTooLong, None);
        assert_eq!(
            f.reason,
            "context_too_long from groq/llama: upstream says no"
        );
        assert_eq!(
            f.note.as_deref(),
            Some("groq/llama: context too long: upstream says no")
        );
        let f = outcome(Outcome::InvalidRequest, None);
        assert_eq!(
            f.reason,
            "invalid_request from groq/llama: upstream says no"
        );
        assert_eq!(f.note, None);
        let f = outcome(Outcome::RequestTooLarge, None);
        assert_eq!(
            f.reason,
            "request_too_large: every key of every route refused the request as too large; last: groq/llama on groq#2: upstream says no"
        );
        let quota = Outcome::QuotaExhausted {
            reset,
            scope: QuotaScope::Key,
        };
        let f = outcome(quota, Some("2026-12-05T08:00:00.000Z"));
        assert_eq!(
            f.note.as_deref(),
            Some("quota_exhausted on key groq#2 until 2026-12-05T08:00:00.000Z: upstream says no")
        );
        let park = Outcome::QuotaExhausted {
            reset: None,
            scope: QuotaScope::Model("llama".into()),
        };
        assert_eq!(
            outcome(park, None).note.as_deref(),
            Some("quota for model llama on key groq#2 exhausted: upstream says no")
        );
    }

    #[test]
    fn every_network_error_maps_to_its_retry_key_effect_and_job_failure() {
        let tls = network(NetError::Tls("invalid peer certificate".into()));
        assert_eq!(
            shape(&tls),
            (
                "tls_error",
                Retry::Prune(Prune::Provider("groq".into())),
                KeyEffect::GiveBack,
                FailureKind::Upstream
            )
        );
        assert!(
            tls.reason
                .starts_with("provider groq (https://api.example.com/v1): TLS"),
            "{}",
            tls.reason
        );
        assert!(tls.reason.contains("ca_file"), "{}", tls.reason);
        let deadline = network(NetError::Deadline(Duration::from_secs(3)));
        assert_eq!(
            shape(&deadline),
            (
                "deadline",
                Retry::Never,
                KeyEffect::Unknown,
                FailureKind::Deadline
            )
        );
        assert_eq!(
            deadline.reason,
            "deadline reached during the call to groq/llama on groq#2"
        );
        let bad = network(NetError::BadRequest("method \"GE T\"".into()));
        assert_eq!(
            shape(&bad),
            (
                "plugin_error",
                Retry::Never,
                KeyEffect::GiveBack,
                FailureKind::Upstream
            )
        );
        assert!(
            bad.reason
                .starts_with("plugin openai built a request that cannot be sent"),
            "{}",
            bad.reason
        );
        let too_large = network(NetError::TooLarge { limit: 10 });
        assert_eq!(
            shape(&too_large),
            (
                "response_too_large",
                Retry::Backoff,
                KeyEffect::Unknown,
                FailureKind::Exhausted
            )
        );
        for e in [
            NetError::Timeout(Duration::from_secs(1)),
            NetError::Connect("refused".into()),
            NetError::Other("reset".into()),
        ] {
            let msg = e.to_string();
            let f = network(e);
            assert_eq!(
                shape(&f),
                (
                    "network",
                    Retry::Backoff,
                    KeyEffect::Unknown,
                    FailureKind::Exhausted
                ),
                "{msg}"
            );
            assert_eq!(f.reason, format!("transient failures; last: {msg}"));
            assert_eq!(f.note, Some(msg));
        }
    }

    #[test]
    fn a_tls_failure_is_not_sent_and_other_network_failures_are_transient() {
        // Untouched would settle a re-probe of a disabled key as good.
        assert_eq!(
            network(NetError::Tls("invalid peer certificate".into()))
                .key
                .fate(),
            Fate::NotSent
        );
        assert_eq!(
            network(NetError::Connect("refused".into())).key.fate(),
            Fate::Transient
        );
        // A plugin's unsendable request is its bug: never retried as network.
        assert_eq!(
            network(NetError::BadRequest("method \"GE T\"".into()))
                .key
                .fate(),
            Fate::NotSent
        );
    }

    #[test]
    fn every_plugin_failure_fails_the_job_and_leaves_the_key_as_it_was() {
        let plugin = || "openai".to_string();
        let failures = [
            PluginCallError::Call(CallError::Panic {
                plugin: plugin(),
                call: "prepare",
                message: "boom".into(),
            }),
            PluginCallError::Call(CallError::Refused {
                plugin: plugin(),
                call: "prepare",
                message: "no".into(),
            }),
            PluginCallError::Call(CallError::Garbage {
                plugin: plugin(),
                call: "parse",
                reason: "not json".into(),
            }),
            PluginCallError::TimedOut {
                plugin: plugin(),
                call: "parse",
                limit: Duration::from_secs(5),
            },
            PluginCallError::Quarantined {
                plugin: plugin(),
                reason: "3 calls timed out".into(),
            },
            PluginCallError::Lost {
                plugin: plugin(),
                call: "prepare",
            },
            PluginCallError::NotLoaded {
                plugin: plugin(),
                dir: PathBuf::from("/plugins"),
            },
        ];
        let r = route("groq", "llama", None);
        let k = key();
        let at = Site {
            route: &r,
            key: &k,
            reset_at: None,
        };
        for e in failures {
            let f = Failure::of_call(&CallFailure::Plugin(e.clone()), at);
            assert_eq!(f, Failure::of_plugin(&e));
            assert_eq!(
                shape(&f),
                (
                    "plugin_error",
                    Retry::Never,
                    KeyEffect::Keep,
                    FailureKind::Upstream
                ),
                "{e}"
            );
            assert_eq!(f.reason, e.to_string());
            assert!(f.reason.contains("openai"), "{}", f.reason);
        }
    }

    #[test]
    fn every_gate_failure_gives_the_call_back_and_asks_the_key_again_later() {
        let redis = GateError::Redis(redis::RedisError::from((
            redis::ErrorKind::Io,
            "connection refused",
        )));
        let protocol = GateError::Protocol("nil".into());
        for (e, outcome) in [(redis, "gate_unavailable"), (protocol, "gate_protocol")] {
            let f = Failure::of_gate(&e);
            assert_eq!(
                shape(&f),
                (
                    outcome,
                    Retry::After(UNAVAILABLE_RETRY),
                    KeyEffect::GiveBack,
                    FailureKind::Deadline
                )
            );
            // The job's last upstream error stays what the upstream said.
            assert_eq!(f.note, None);
            assert_eq!(f.key.fate(), Fate::NotSent);
            assert_eq!(f.key.gate_fate(), Fate::NotSent);
        }
    }

    #[test]
    fn a_key_effect_reaches_the_pool_with_the_message_and_the_gate_with_its_cause() {
        let reset = Some(QuotaReset::NextDaily);
        let cases = [
            (KeyEffect::Keep, Fate::Untouched, Fate::Untouched),
            (KeyEffect::Unknown, Fate::Transient, Fate::Transient),
            (KeyEffect::GiveBack, Fate::NotSent, Fate::NotSent),
            (
                KeyEffect::CoolDown {
                    hint: Some(Duration::from_secs(2)),
                },
                Fate::RateLimited {
                    retry_after: Some(Duration::from_secs(2)),
                },
                Fate::RateLimited {
                    retry_after: Some(Duration::from_secs(2)),
                },
            ),
            (
                KeyEffect::Disable {
                    cause: AUTH_FAILED,
                    reason: "auth_failed: bad key".into(),
                    reprobe: Reprobe::OnSchedule,
                },
                Fate::Disabled {
                    reason: "auth_failed: bad key".into(),
                },
                Fate::Disabled {
                    reason: AUTH_FAILED.into(),
                },
            ),
            (
                KeyEffect::Disable {
                    cause: QUOTA_EXHAUSTED,
                    reason: "quota_exhausted: spent".into(),
                    reprobe: Reprobe::AtReset(reset.clone()),
                },
                Fate::QuotaExhausted {
                    reason: "quota_exhausted: spent".into(),
                    reset: reset.clone(),
                },
                Fate::QuotaExhausted {
                    reason: QUOTA_EXHAUSTED.into(),
                    reset: reset.clone(),
                },
            ),
            (
                KeyEffect::Park {
                    model: "llama".into(),
                    reason: "quota_exhausted: spent".into(),
                    reset: reset.clone(),
                },
                Fate::ModelQuota {
                    model: "llama".into(),
                    reason: "quota_exhausted: spent".into(),
                    reset: reset.clone(),
                },
                Fate::ModelQuota {
                    model: "llama".into(),
                    reason: QUOTA_EXHAUSTED.into(),
                    reset,
                },
            ),
        ];
        for (effect, pool, gate) in cases {
            assert_eq!(effect.fate(), pool, "{effect:?}");
            assert_eq!(effect.gate_fate(), gate, "{effect:?}");
        }
    }

    #[test]
    fn pruning_drops_the_route_the_provider_or_the_smaller_contexts() {
        let small = route("groq", "small", Some(8192));
        let same = route("openai", "same", Some(8192));
        let large = route("openai", "large", Some(32768));
        let unknown = route("groq", "unknown", None);
        let kept = |p: &Prune| {
            [&small, &same, &large, &unknown]
                .into_iter()
                .filter(|r| p.keeps(r))
                .map(|r| r.model.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kept(&Prune::Route("groq/small".into())),
            ["same", "large", "unknown"]
        );
        assert_eq!(kept(&Prune::Provider("groq".into())), ["same", "large"]);
        let context = Prune::ContextAtMost {
            route: "groq/small".into(),
            context: Some(8192),
        };
        assert_eq!(kept(&context), ["large", "unknown"]);
        // A route of unknown context dropped itself only.
        let unknown_context = Prune::ContextAtMost {
            route: "groq/unknown".into(),
            context: None,
        };
        assert_eq!(kept(&unknown_context), ["small", "same", "large"]);
        let key_only = Prune::KeyOnRoute {
            route: "groq/small".into(),
            key: key(),
        };
        assert_eq!(kept(&key_only), ["small", "same", "large", "unknown"]);
    }
}
